//! Cluster events a node publishes to its subscribers.

use std::sync::Arc;

use crate::node::Node;
use crate::task::TaskMeta;

/// A change in the cluster as seen by this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Membership changes.
    Node(NodeEvent),
    /// Task definition changes.
    Task(TaskEvent),
}

/// A member joined, changed or left.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// A node appeared.
    Put(Node),
    /// A known node rewrote its record (status, static tasks).
    Changed(Node),
    /// A node left or expired.
    Delete(String),
}

/// A dynamic task or tombstone changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskEvent {
    /// A dynamic task was added or overwritten.
    Put(Arc<TaskMeta>),
    /// A dynamic task definition was removed.
    Delete(String),
    /// A task was marked deleted (tombstone written).
    Tombstoned(String),
    /// A tombstone was removed.
    Revived(String),
}
