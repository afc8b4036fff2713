//! [`Strategy::Range`](super::Strategy::Range) and
//! [`Strategy::RoundRobin`](super::Strategy::RoundRobin): both use the
//! position of a task in the (sorted) task list.

use crate::node::Node;

/// Task `i` of `len` goes to node `i * N / len`: N contiguous runs whose
/// counts differ by at most one.
pub(super) fn assign_range(nodes: &[Node], tasks: &[&str]) -> Vec<usize> {
    let n = nodes.len() as u128;
    let len = tasks.len() as u128;
    if n == 0 || len == 0 {
        return Vec::new();
    }
    (0..len).map(|i| (i * n / len) as usize).collect()
}

/// Task `i` goes to node `i % N`.
pub(super) fn assign_round_robin(nodes: &[Node], tasks: &[&str]) -> Vec<usize> {
    let n = nodes.len();
    if n == 0 {
        return Vec::new();
    }
    (0..tasks.len()).map(|i| i % n).collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{counts, nodes, task_names};
    use super::*;

    fn spread(counts: &[usize]) -> usize {
        let max = counts.iter().max().copied().unwrap_or(0);
        let min = counts.iter().min().copied().unwrap_or(0);
        max - min
    }

    #[test]
    fn round_robin_counts_differ_by_at_most_one() {
        for (n, len) in [(3, 10), (7, 100), (10, 5), (1, 3), (4, 4)] {
            let names = task_names(len);
            let tasks: Vec<&str> = names.iter().map(String::as_str).collect();
            let owners = assign_round_robin(&nodes(n), &tasks);
            assert_eq!(owners.len(), len);
            assert!(spread(&counts(&owners, n)) <= 1, "n={n} len={len}");
            assert_eq!(
                owners[..n.min(len)],
                (0..n.min(len)).collect::<Vec<_>>()[..]
            );
        }
    }

    #[test]
    fn range_gives_contiguous_ordered_even_runs() {
        for (n, len) in [(3, 10), (7, 100), (10, 5), (1, 3), (4, 4), (3, 100_000)] {
            let names = task_names(len);
            let tasks: Vec<&str> = names.iter().map(String::as_str).collect();
            let owners = assign_range(&nodes(n), &tasks);
            assert_eq!(owners.len(), len);
            // Non-decreasing owners means each node's tasks form one run,
            // and runs come in node order.
            assert!(owners.windows(2).all(|w| w[0] <= w[1]), "n={n} len={len}");
            assert!(
                n > len || owners.windows(2).all(|w| w[1] - w[0] <= 1),
                "n={n} len={len}"
            );
            assert!(spread(&counts(&owners, n)) <= 1, "n={n} len={len}");
            assert_eq!(owners[0], 0);
        }
        assert_eq!(
            assign_range(&nodes(3), &["a", "b", "c", "d", "e", "f"]),
            [0, 0, 1, 1, 2, 2]
        );
    }
}
