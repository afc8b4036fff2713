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

    /// Whether `other` is a record written by the same incarnation (the
    /// same start of the same process) as this one.
    ///
    /// A node sets `create_time` at every start, unique within the process
    /// (see `Dcron::start`), and keeps it while it runs (re-registrations
    /// included); with `hostname` and `ip` it tells a node's own record
    /// from one another process wrote under the same id. Two processes on
    /// one host and address that start in the same millisecond look alike.
    pub(crate) fn same_incarnation(&self, other: &Node) -> bool {
        self.id == other.id && self.incarnation() == other.incarnation()
    }

    /// Orders the incarnations of one node id, older first: by
    /// `create_time`, then host name, then address. Every process compares
    /// the same stored values, so all agree on which of two is older,
    /// whatever their clocks say.
    pub(crate) fn is_older_than(&self, other: &Node) -> bool {
        self.incarnation() < other.incarnation()
    }

    fn incarnation(&self) -> (i64, &str, &str) {
        (self.create_time, &self.hostname, &self.ip)
    }

    /// Whether this node defines the static task `name`.
    pub fn defines(&self, name: &str) -> bool {
        // Linear: records written by other programs may not be sorted.
        self.static_tasks.iter().any(|n| n == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(create_time: i64, hostname: &str) -> Node {
        Node {
            id: "n1".into(),
            ip: "10.0.0.1".into(),
            hostname: hostname.into(),
            last_alive: 0,
            create_time,
            status: NodeStatus::Working,
            weight: 1,
            strategy: None,
            dynamic_tasks: true,
            static_tasks: Vec::new(),
        }
    }

    #[test]
    fn incarnations_tell_records_apart_and_agree_on_the_older() {
        let mine = record(1_000, "a");
        let mut rewritten = mine.clone();
        rewritten.status = NodeStatus::Leaving;
        rewritten.last_alive = 5_000;
        rewritten.static_tasks = vec!["s".into()];
        assert!(
            mine.same_incarnation(&rewritten),
            "a node's own record, rewritten"
        );
        let later = record(2_000, "a");
        let elsewhere = record(1_000, "b");
        for other in [&later, &elsewhere] {
            assert!(!mine.same_incarnation(other));
            // Both sides agree on which one is older.
            assert!(mine.is_older_than(other) && !other.is_older_than(&mine));
        }
        let other_id = Node {
            id: "n2".into(),
            ..mine.clone()
        };
        assert!(!mine.same_incarnation(&other_id));
    }
}
