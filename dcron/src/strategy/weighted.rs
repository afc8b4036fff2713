//! [`Strategy::Weighted`](super::Strategy::Weighted): weighted rendezvous
//! (highest random weight) hashing.
//!
//! For each task and node, `u = xxh3_64_with_seed(name, xxh3_64(node_id))`
//! mapped into the open interval (0, 1), and `score = w / -ln(u)` with the
//! node's weight `w` (0 counts as 1). The highest score wins, ties to the
//! lower node index. Each node gets a share of tasks proportional to its
//! weight, and a change of nodes only moves the tasks of the node that left
//! or to the node that joined.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::node::Node;

/// A 64-bit hash as a float in the open interval (0, 1): the top 52 bits,
/// centred in their bucket. Both ends are exact in f64 (the largest value is
/// `1 - 2^-53`), so neither 0 nor 1 can come out.
fn unit(hash: u64) -> f64 {
    const SCALE: f64 = 1.0 / (1u64 << 52) as f64;
    ((hash >> 12) as f64 + 0.5) * SCALE
}

/// Score of a node for a task hash: `w / -ln(u)`, finite and positive.
fn score(weight: f64, hash: u64) -> f64 {
    // u < 1 so -ln(u) > 0 (at least about 1.1e-16); u > 0 so it is finite.
    weight / -unit(hash).ln()
}

pub(super) fn assign(nodes: &[Node], tasks: &[&str]) -> Vec<usize> {
    // (seed, weight) per node, computed once.
    let params: Vec<(u64, f64)> = nodes
        .iter()
        .map(|n| (xxh3_64(n.id.as_bytes()), f64::from(n.weight.max(1))))
        .collect();
    if params.is_empty() {
        return Vec::new();
    }
    tasks
        .iter()
        .map(|t| {
            let name = t.as_bytes();
            let mut best = 0;
            let mut best_score = f64::NEG_INFINITY;
            for (index, &(seed, weight)) in params.iter().enumerate() {
                let s = score(weight, xxh3_64_with_seed(name, seed));
                // Strictly greater: ties stay with the lower index.
                if s > best_score {
                    best = index;
                    best_score = s;
                }
            }
            best
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{counts, movement, node, nodes, task_names};
    use super::*;

    #[test]
    fn weighted_unit_stays_inside_open_interval() {
        for h in [0, 1, u64::MAX, u64::MAX - 1, 1 << 63] {
            let u = unit(h);
            assert!(u > 0.0 && u < 1.0, "{h}: {u}");
            let s = score(f64::from(u32::MAX), h);
            assert!(s.is_finite() && s > 0.0, "{h}: {s}");
        }
    }

    #[test]
    fn weighted_shares_follow_weights() {
        let names = task_names(30_000);
        let tasks: Vec<&str> = names.iter().map(String::as_str).collect();
        let ns = vec![node("a", 1), node("b", 2), node("c", 3)];
        let c = counts(&assign(&ns, &tasks), 3);
        for (i, expected) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].into_iter().enumerate() {
            let share = c[i] as f64 / tasks.len() as f64;
            assert!(
                (share - expected).abs() <= 0.03,
                "node {i}: {share} vs {expected}"
            );
        }
    }

    #[test]
    fn weighted_zero_weight_counts_as_one() {
        let names = task_names(1_000);
        let tasks: Vec<&str> = names.iter().map(String::as_str).collect();
        let zero = vec![node("a", 0), node("b", 0)];
        let one = vec![node("a", 1), node("b", 1)];
        assert_eq!(assign(&zero, &tasks), assign(&one, &tasks));
    }

    #[test]
    fn weighted_join_moves_only_to_new_node() {
        let names = task_names(10_000);
        let tasks: Vec<&str> = names.iter().map(String::as_str).collect();
        let before_nodes = nodes(10);
        let before = assign(&before_nodes, &tasks);
        let mut after_nodes = before_nodes.clone();
        after_nodes.push(node("node-004x", 1));
        after_nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let after = assign(&after_nodes, &tasks);
        let (moved, only_to_new) =
            movement(&before_nodes, &before, &after_nodes, &after, "node-004x");
        assert!(only_to_new);
        assert!((0.05..=0.15).contains(&moved), "moved {moved}");
    }

    #[test]
    fn weighted_duplicate_ids_tie_to_lower_index() {
        let names = task_names(100);
        let tasks: Vec<&str> = names.iter().map(String::as_str).collect();
        let dup = vec![node("a", 1), node("a", 1)];
        assert!(assign(&dup, &tasks).iter().all(|&i| i == 0));
    }
}
