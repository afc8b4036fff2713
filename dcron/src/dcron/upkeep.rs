//! Keeping the view of the cluster: one change from the watch at a time,
//! or a full reload; each real change emits its event and wakes the
//! ownership reconcile.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::Inner;
use crate::error::Result;
use crate::events::{Event, NodeEvent, TaskEvent};
use crate::node::NodeStatus;
use crate::registry::WatchEvent;

impl Inner {
    /// Applies one change to the view, emitting the matching event.
    pub(super) fn apply(&self, event: WatchEvent) {
        let mut st = self.lock();
        let out = match event {
            WatchEvent::NodePut(mut node) => {
                if node.id == st.me.id {
                    // Our own static tasks are known locally; don't keep a copy.
                    node.static_tasks = Vec::new();
                }
                // `last_alive` moves with heartbeats: not a change of the record.
                let ev = match st.view.nodes.get(&node.id) {
                    None => Some(NodeEvent::Put(node.clone())),
                    Some(old) if !old.same_record(&node) => Some(NodeEvent::Changed(node.clone())),
                    Some(_) => None,
                };
                st.view.nodes.insert(node.id.clone(), node);
                ev.map(Event::Node)
            }
            // A working node never drops itself from its own view: if the
            // registry expired it (an outage longer than the TTL), the
            // heartbeat re-registers it, and meanwhile it keeps its tasks
            // (others may take them too; claims keep each fire single).
            WatchEvent::NodeDelete(id) if id == st.me.id && st.me.status == NodeStatus::Working => {
                tracing::debug!(node = %id, "own registration gone from the registry; keeping own tasks until re-registered");
                None
            }
            WatchEvent::NodeDelete(id) => st
                .view
                .nodes
                .remove(&id)
                .map(|_| Event::Node(NodeEvent::Delete(id))),
            // An unchanged definition (every reload repeats them all) keeps
            // its shared copy, so the engine sees the very same task.
            WatchEvent::TaskPut(meta)
                if st
                    .view
                    .tasks
                    .get(&meta.name)
                    .is_some_and(|old| **old == meta) =>
            {
                None
            }
            WatchEvent::TaskPut(meta) => {
                let meta = Arc::new(meta);
                st.view.tasks.insert(meta.name.clone(), meta.clone());
                Some(Event::Task(TaskEvent::Put(meta)))
            }
            WatchEvent::TaskDelete(name) => st
                .view
                .tasks
                .remove(&name)
                .map(|_| Event::Task(TaskEvent::Delete(name))),
            WatchEvent::TombstonePut(name) => st
                .view
                .tombstones
                .insert(name.clone())
                .then_some(Event::Task(TaskEvent::Tombstoned(name))),
            WatchEvent::TombstoneDelete(name) => st
                .view
                .tombstones
                .remove(&name)
                .then_some(Event::Task(TaskEvent::Revived(name))),
            WatchEvent::Resync => None,
        };
        drop(st);
        if let Some(ev) = out {
            self.emit(ev);
            self.dirty.notify_one();
        }
    }

    /// Replaces the view with a full read of the registry. On error the
    /// last known view stays (a failed read never revives a tombstone).
    pub(super) async fn reload_view(&self) -> Result<()> {
        let (reg, ns) = (&self.registry, self.ns.as_str());
        let nodes = self.call("list nodes", reg.nodes(ns)).await?;
        let tasks = self.call("list tasks", reg.tasks(ns)).await?;
        let tombstones = self.call("list tombstones", reg.tombstones(ns)).await?;
        let (old_nodes, old_tasks, old_tombstones) = {
            let st = self.lock();
            (
                st.view.nodes.keys().cloned().collect::<Vec<_>>(),
                st.view.tasks.keys().cloned().collect::<Vec<_>>(),
                st.view.tombstones.clone(),
            )
        };
        let new_nodes: BTreeSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        let new_tasks: BTreeSet<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
        let new_tombstones: BTreeSet<&String> = tombstones.iter().collect();
        for id in old_nodes
            .into_iter()
            .filter(|id| !new_nodes.contains(id.as_str()))
        {
            self.apply(WatchEvent::NodeDelete(id));
        }
        for name in old_tasks
            .into_iter()
            .filter(|n| !new_tasks.contains(n.as_str()))
        {
            self.apply(WatchEvent::TaskDelete(name));
        }
        for name in old_tombstones
            .iter()
            .filter(|n| !new_tombstones.contains(n))
        {
            self.apply(WatchEvent::TombstoneDelete(name.clone()));
        }
        for node in nodes {
            self.apply(WatchEvent::NodePut(node));
        }
        for meta in tasks {
            self.apply(WatchEvent::TaskPut(meta));
        }
        for name in tombstones {
            self.apply(WatchEvent::TombstonePut(name));
        }
        self.lock().tombstones_known = true;
        Ok(())
    }
}
