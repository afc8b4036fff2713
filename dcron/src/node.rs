//! Cluster members as stored in the registry.

use serde::{Deserialize, Serialize};

/// Lifecycle of a node: `starting` → `working` → `leaving` → gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Registered, loading state; owns no tasks yet.
    Starting,
    /// Owns and fires tasks.
    Working,
    /// Stopping: others take over its tasks at once.
    Leaving,
}

impl NodeStatus {
    /// Lower-case name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Starting => "starting",
            NodeStatus::Working => "working",
            NodeStatus::Leaving => "leaving",
        }
    }
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One member of the cluster, as published in the registry.
///
/// Times are milliseconds since the Unix epoch. `last_alive` is the
/// registry's own knowledge of the node's last liveness signal where the
/// backend has one (otherwise the last write of the record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Unique id of the node (default: a UUID).
    pub id: String,
    /// Address other operators can reach the node at (informational).
    pub ip: String,
    /// Host name (informational).
    pub hostname: String,
    /// Last liveness signal, epoch ms.
    pub last_alive: i64,
    /// When the node registered, epoch ms.
    pub create_time: i64,
    /// Lifecycle state.
    pub status: NodeStatus,
    /// Relative capacity for the `Weighted` strategy; 0 counts as 1.
    pub weight: u32,
    /// The assignment strategy the node uses (kebab-case name, `custom` for
    /// a custom [`Assigner`](crate::Assigner)); lets tools show owners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Whether the node runs dynamic tasks (it has a task handler); nodes
    /// without one are never assigned dynamic tasks.
    #[serde(default = "yes")]
    pub dynamic_tasks: bool,
    /// Names of the static tasks this node defines, sorted. Only nodes that
    /// define a static task may own it.
    #[serde(default)]
    pub static_tasks: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Node {
    /// Equal records apart from `last_alive` (which moves with heartbeats).
    pub(crate) fn same_record(&self, other: &Node) -> bool {
        let Node {
            id,
            ip,
            hostname,
            last_alive: _,
            create_time,
            status,
            weight,
            strategy,
            dynamic_tasks,
            static_tasks,
        } = self;
        *id == other.id
            && *ip == other.ip
            && *hostname == other.hostname
            && *create_time == other.create_time
            && *status == other.status
            && *weight == other.weight
            && *strategy == other.strategy
            && *dynamic_tasks == other.dynamic_tasks
            && *static_tasks == other.static_tasks
    }

    /// Whether this node defines the static task `name`.
    pub fn defines(&self, name: &str) -> bool {
        // Linear: records written by other programs may not be sorted.
        self.static_tasks.iter().any(|n| n == name)
    }
}
