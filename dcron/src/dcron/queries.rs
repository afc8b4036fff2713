//! What a node can say about the cluster and itself.

use std::collections::BTreeSet;

use tokio::sync::broadcast;

use super::Dcron;
use crate::error::Result;
use crate::events::Event;
use crate::node::Node;

impl Dcron {
    /// Live nodes, read from the registry.
    pub async fn nodes(&self) -> Result<Vec<Node>> {
        self.inner.admin.nodes().await
    }

    /// Every task name known to this node: its static tasks, those of the
    /// other nodes, and the dynamic ones (tombstoned ones included).
    pub fn all_tasks(&self) -> Vec<String> {
        let st = self.inner.lock();
        let mut names: BTreeSet<&str> = st.statics.keys().map(String::as_str).collect();
        names.extend(st.view.tasks.keys().map(String::as_str));
        for node in st.view.nodes.values() {
            names.extend(node.static_tasks.iter().map(String::as_str));
        }
        names.into_iter().map(str::to_string).collect()
    }

    /// The tasks this node owns now (it fires them), sorted.
    pub fn owned_tasks(&self) -> Vec<String> {
        self.inner.engine.owned()
    }

    /// The tasks this node owns now: the same as
    /// [`owned_tasks`](Self::owned_tasks), under the name it had first
    /// (it never meant "running at this moment").
    #[deprecated(note = "returns the tasks this node owns: use `owned_tasks`")]
    pub fn my_running_tasks(&self) -> Vec<String> {
        self.owned_tasks()
    }

    /// Fires of tasks this node owned that did not run, since the node was
    /// built (each also logged at ERROR and passed to the error handler as
    /// [`Error::FireMissed`](crate::Error::FireMissed)).
    pub fn missed_fires(&self) -> u64 {
        self.inner.engine.missed()
    }

    /// A stream of node and task events as this node sees them.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }
}
