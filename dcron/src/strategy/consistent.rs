//! [`Strategy::Consistent`](super::Strategy::Consistent): a hash ring with
//! virtual points.
//!
//! Each node puts [`POINTS_PER_NODE`] points on a 64-bit ring at
//! `xxh3_64("{node_id}#{i}")`; a task hashes to `xxh3_64(name)` and belongs to
//! the node of the first point at or after it, wrapping around. A joining
//! node only takes tasks (about 1/N of them), a leaving node only gives its
//! own away.

use std::fmt::Write as _;

use xxhash_rust::xxh3::xxh3_64;

use crate::node::Node;

/// Virtual points per node on the ring.
pub(super) const POINTS_PER_NODE: u32 = 160;

/// The ring of one node set: points sorted by (hash, node index).
struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    fn new(nodes: &[Node]) -> Ring {
        let mut points = Vec::with_capacity(nodes.len() * POINTS_PER_NODE as usize);
        let mut key = String::new();
        for (index, node) in nodes.iter().enumerate() {
            for i in 0..POINTS_PER_NODE {
                key.clear();
                // Writing into a String cannot fail.
                let _ = write!(key, "{}#{}", node.id, i);
                points.push((xxh3_64(key.as_bytes()), index));
            }
        }
        // Equal hashes (duplicate ids) go to the lower index.
        points.sort_unstable();
        Ring { points }
    }

    /// Index of the node owning `hash`: first point clockwise. `None` only
    /// for an empty ring.
    fn owner(&self, hash: u64) -> Option<usize> {
        let at = self.points.partition_point(|&(h, _)| h < hash);
        self.points
            .get(at)
            .or_else(|| self.points.first())
            .map(|&(_, index)| index)
    }
}

pub(super) fn assign(nodes: &[Node], tasks: &[&str]) -> Vec<usize> {
    let ring = Ring::new(nodes);
    tasks
        .iter()
        .map(|t| ring.owner(xxh3_64(t.as_bytes())).unwrap_or(0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{movement, node, nodes, task_names};
    use super::*;

    #[test]
    fn consistent_join_moves_about_one_nth_only_to_new_node() {
        let names = task_names(10_000);
        let tasks: Vec<&str> = names.iter().map(String::as_str).collect();
        let before_nodes = nodes(10);
        let before = assign(&before_nodes, &tasks);
        let mut after_nodes = before_nodes.clone();
        // Sorts in the middle, so indices of later nodes shift.
        after_nodes.push(node("node-004x", 1));
        after_nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let after = assign(&after_nodes, &tasks);
        let (moved, only_to_new) =
            movement(&before_nodes, &before, &after_nodes, &after, "node-004x");
        assert!((0.05..=0.15).contains(&moved), "moved {moved}");
        assert!(only_to_new);
        // And leaving again restores the old assignment.
        let (back, _) = movement(&after_nodes, &after, &before_nodes, &before, "");
        assert_eq!(back, moved);
    }

    #[test]
    fn consistent_wraps_around_the_ring() {
        let ring = Ring::new(&nodes(3));
        let first = ring.points[0].1;
        assert_eq!(ring.owner(u64::MAX), Some(first));
        assert_eq!(ring.owner(0), Some(first));
        let last = ring.points[ring.points.len() - 1];
        assert_eq!(ring.owner(last.0), Some(last.1));
        assert_eq!(Ring::new(&[]).owner(5), None);
    }

    #[test]
    fn consistent_duplicate_ids_go_to_lower_index() {
        let dup = vec![node("a", 1), node("a", 1)];
        let names = task_names(100);
        let tasks: Vec<&str> = names.iter().map(String::as_str).collect();
        assert!(assign(&dup, &tasks).iter().all(|&i| i == 0));
    }
}
