//! [`Strategy::HashSharding`](super::Strategy::HashSharding) and
//! [`Strategy::HashSlot`](super::Strategy::HashSlot).

use crc16::{State, XMODEM};
use xxhash_rust::xxh3::xxh3_64;

use crate::node::Node;

/// Number of Redis-style hash slots.
pub(super) const SLOTS: u16 = 16384;

/// Redis's key slot: `crc16_xmodem(name) % 16384`.
pub(super) fn slot(name: &str) -> u16 {
    State::<XMODEM>::calculate(name.as_bytes()) % SLOTS
}

/// `xxh3_64(name) % N`.
pub(super) fn assign_sharding(nodes: &[Node], tasks: &[&str]) -> Vec<usize> {
    let n = nodes.len() as u64;
    if n == 0 {
        return Vec::new();
    }
    tasks
        .iter()
        .map(|t| (xxh3_64(t.as_bytes()) % n) as usize)
        .collect()
}

/// Slots dealt to nodes as contiguous ranges: node = slot * N / 16384.
pub(super) fn assign_slot(nodes: &[Node], tasks: &[&str]) -> Vec<usize> {
    let n = nodes.len() as u128;
    if n == 0 {
        return Vec::new();
    }
    tasks
        .iter()
        .map(|t| (u128::from(slot(t)) * n / u128::from(SLOTS)) as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{counts, nodes};
    use super::*;

    #[test]
    fn hash_slot_matches_redis() {
        // Values from Redis's CLUSTER KEYSLOT.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("bar"), 5061);
        assert_eq!(slot("hello"), 866);
        assert_eq!(slot(""), 0);
    }

    #[test]
    fn hash_slot_ranges_are_contiguous_and_even() {
        // Owner of every slot, via the same formula.
        for n in [1usize, 3, 7, 300, 20_000] {
            let mut per_node = vec![0usize; n];
            let mut last = 0;
            for s in 0..u128::from(SLOTS) {
                let owner = (s * n as u128 / u128::from(SLOTS)) as usize;
                assert!(owner >= last && owner < n);
                last = owner;
                per_node[owner] += 1;
            }
            let (min, max) = (per_node.iter().min(), per_node.iter().max());
            if n <= usize::from(SLOTS) {
                assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "n={n}");
            }
        }
        let three = nodes(3);
        assert_eq!(assign_slot(&three, &["foo"]), vec![2]);
        assert_eq!(
            counts(&assign_slot(&three, &["foo", "bar"]), 3),
            vec![1, 0, 1]
        );
    }

    #[test]
    fn hash_sharding_is_hash_mod_n() {
        let three = nodes(3);
        for t in ["a", "task-1", "x.y:z"] {
            let expected = (xxh3_64(t.as_bytes()) % 3) as usize;
            assert_eq!(assign_sharding(&three, &[t]), vec![expected]);
        }
    }
}
