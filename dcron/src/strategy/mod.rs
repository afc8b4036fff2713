//! Task assignment: which working node owns which task.
//!
//! Every node computes the assignment itself from the same view (working
//! nodes sorted by id, their weights, the task names), so all nodes agree
//! without talking to each other.

use crate::node::Node;

/// Decides the owner of each task among a set of nodes.
///
/// Implementations must be deterministic: the same `nodes` and `tasks` give
/// the same answer on every machine and every run (no random seeds, no
/// per-process hash keys).
pub trait Assigner: Send + Sync + 'static {
    /// Returns, for each task in `tasks`, the index in `nodes` of its owner.
    ///
    /// `nodes` are the eligible working nodes sorted by id; `tasks` are
    /// sorted by name and distinct. The result has `tasks.len()` entries,
    /// each `< nodes.len()`. When `nodes` is empty the result is empty.
    /// Must not panic for any input (including weights of 0).
    fn assign(&self, nodes: &[Node], tasks: &[&str]) -> Vec<usize>;
}

/// The built-in assignment strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// Hash ring with virtual points: about 1/N of the tasks move when a
    /// node joins or leaves.
    #[default]
    Consistent,
    /// `hash(name) % N`: simplest, even, but most tasks move on a change.
    HashSharding,
    /// Redis-style 16384 slots (`crc16(name) % 16384`) dealt evenly.
    HashSlot,
    /// Sorted names split into N contiguous runs of equal count.
    Range,
    /// Weighted rendezvous hashing: share proportional to weight.
    Weighted,
    /// Sorted names dealt round-robin: perfectly even counts.
    RoundRobin,
}

mod consistent;
mod hash;
mod ordered;
mod weighted;

impl Strategy {
    /// Every built-in strategy, in declaration order.
    pub const ALL: [Strategy; 6] = [
        Strategy::Consistent,
        Strategy::HashSharding,
        Strategy::HashSlot,
        Strategy::Range,
        Strategy::Weighted,
        Strategy::RoundRobin,
    ];

    /// The kebab-case name (`consistent`, `hash-sharding`, `hash-slot`,
    /// `range`, `weighted`, `round-robin`), as shown by [`Display`](std::fmt::Display)
    /// and accepted by [`FromStr`](std::str::FromStr).
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Consistent => "consistent",
            Strategy::HashSharding => "hash-sharding",
            Strategy::HashSlot => "hash-slot",
            Strategy::Range => "range",
            Strategy::Weighted => "weighted",
            Strategy::RoundRobin => "round-robin",
        }
    }
}

impl Assigner for Strategy {
    fn assign(&self, nodes: &[Node], tasks: &[&str]) -> Vec<usize> {
        if nodes.is_empty() || tasks.is_empty() {
            return Vec::new();
        }
        match self {
            Strategy::Consistent => consistent::assign(nodes, tasks),
            Strategy::HashSharding => hash::assign_sharding(nodes, tasks),
            Strategy::HashSlot => hash::assign_slot(nodes, tasks),
            Strategy::Range => ordered::assign_range(nodes, tasks),
            Strategy::Weighted => weighted::assign(nodes, tasks),
            Strategy::RoundRobin => ordered::assign_round_robin(nodes, tasks),
        }
    }
}

impl std::fmt::Display for Strategy {
    /// Writes the kebab-case name, e.g. `hash-slot`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`Strategy`] from an unknown name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseStrategyError {
    input: String,
}

impl ParseStrategyError {
    /// The text that was not recognised.
    pub fn input(&self) -> &str {
        &self.input
    }
}

impl std::fmt::Display for ParseStrategyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown strategy `{}`; valid values are consistent, hash-sharding, hash-slot, \
             range, weighted, round-robin (case-insensitive; hashsharding, hashslot and \
             roundrobin are also accepted)",
            self.input
        )
    }
}

impl std::error::Error for ParseStrategyError {}

impl std::str::FromStr for Strategy {
    type Err = ParseStrategyError;

    /// Parses a strategy name, case-insensitively: `consistent`,
    /// `hash-sharding` / `hashsharding`, `hash-slot` / `hashslot`, `range`,
    /// `weighted`, `round-robin` / `roundrobin`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let strategy = match s.to_ascii_lowercase().as_str() {
            "consistent" => Strategy::Consistent,
            "hash-sharding" | "hashsharding" => Strategy::HashSharding,
            "hash-slot" | "hashslot" => Strategy::HashSlot,
            "range" => Strategy::Range,
            "weighted" => Strategy::Weighted,
            "round-robin" | "roundrobin" => Strategy::RoundRobin,
            _ => {
                return Err(ParseStrategyError {
                    input: s.to_string(),
                })
            }
        };
        Ok(strategy)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::node::{Node, NodeStatus};

    /// A working node with the given id and weight.
    pub(crate) fn node(id: &str, weight: u32) -> Node {
        Node {
            id: id.to_string(),
            ip: String::new(),
            hostname: String::new(),
            last_alive: 0,
            create_time: 0,
            status: NodeStatus::Working,
            weight,
            strategy: None,
            dynamic_tasks: true,
            static_tasks: Vec::new(),
        }
    }

    /// `count` nodes `node-000`, `node-001`, ... of weight 1.
    pub(crate) fn nodes(count: usize) -> Vec<Node> {
        (0..count)
            .map(|i| node(&format!("node-{i:03}"), 1))
            .collect()
    }

    /// `count` task names `task-{i}`, sorted.
    pub(crate) fn task_names(count: usize) -> Vec<String> {
        let mut names: Vec<String> = (0..count).map(|i| format!("task-{i}")).collect();
        names.sort_unstable();
        names
    }

    /// Tasks per node.
    pub(crate) fn counts(owners: &[usize], nodes: usize) -> Vec<usize> {
        let mut counts = vec![0; nodes];
        for &o in owners {
            counts[o] += 1;
        }
        counts
    }

    /// Max tasks per node over the mean.
    pub(crate) fn balance(owners: &[usize], nodes: usize) -> f64 {
        let counts = counts(owners, nodes);
        let max = counts.iter().copied().max().unwrap_or(0) as f64;
        max / (owners.len() as f64 / nodes as f64)
    }

    /// Owner ids before and after a change; returns (moved share, whether
    /// every moved task went to a node with id `to`).
    pub(crate) fn movement(
        before_nodes: &[Node],
        before: &[usize],
        after_nodes: &[Node],
        after: &[usize],
        to: &str,
    ) -> (f64, bool) {
        let mut moved = 0usize;
        let mut only_to_new = true;
        for (b, a) in before.iter().zip(after) {
            let (b, a) = (&before_nodes[*b].id, &after_nodes[*a].id);
            if b != a {
                moved += 1;
                only_to_new &= a == to;
            }
        }
        (moved as f64 / before.len() as f64, only_to_new)
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{balance, node};
    use super::*;
    use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest, Just};
    use proptest::strategy::Strategy as PropStrategy;

    #[test]
    fn parse_and_display_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(s.to_string().parse::<Strategy>(), Ok(s));
            assert_eq!(s.to_string().to_uppercase().parse::<Strategy>(), Ok(s));
        }
        assert_eq!("HashSharding".parse(), Ok(Strategy::HashSharding));
        assert_eq!("hashslot".parse(), Ok(Strategy::HashSlot));
        assert_eq!("RoundRobin".parse(), Ok(Strategy::RoundRobin));
        assert_eq!(Strategy::HashSlot.to_string(), "hash-slot");
        assert_eq!(Strategy::RoundRobin.to_string(), "round-robin");
        let err = "ring".parse::<Strategy>().unwrap_err();
        assert_eq!(err.input(), "ring");
        let msg = err.to_string();
        for s in Strategy::ALL {
            assert!(msg.contains(s.as_str()), "{msg}");
        }
        let _: &dyn std::error::Error = &err;
    }

    #[test]
    fn empty_inputs_give_empty_results() {
        let nodes = vec![node("a", 1), node("b", 0)];
        for s in Strategy::ALL {
            assert!(s.assign(&[], &["x", "y"]).is_empty(), "{s}");
            assert!(s.assign(&nodes, &[]).is_empty(), "{s}");
        }
    }

    #[test]
    fn single_node_owns_everything() {
        let nodes = vec![node("only", 0)];
        let tasks = ["a", "b", "c", "d"];
        for s in Strategy::ALL {
            assert_eq!(s.assign(&nodes, &tasks), vec![0; 4], "{s}");
        }
    }

    #[test]
    fn hash_strategies_balance_on_three_nodes() {
        let nodes = super::test_support::nodes(3);
        let names = super::test_support::task_names(100_000);
        let tasks: Vec<&str> = names.iter().map(String::as_str).collect();
        for s in [
            Strategy::HashSharding,
            Strategy::HashSlot,
            Strategy::Consistent,
        ] {
            let b = balance(&s.assign(&nodes, &tasks), nodes.len());
            assert!(b < 1.3, "{s}: balance {b}");
        }
    }

    fn arb_nodes() -> impl PropStrategy<Value = Vec<Node>> {
        prop::collection::vec(
            (
                "[a-z0-9-]{0,8}",
                prop_oneof![Just(0u32), Just(1u32), Just(u32::MAX), any::<u32>()],
            ),
            0..20,
        )
        .prop_map(|v| v.into_iter().map(|(id, w)| node(&id, w)).collect())
    }

    proptest! {
        #[test]
        fn every_strategy_is_total_in_range_and_deterministic(
            mut nodes in arb_nodes(),
            tasks in prop::collection::vec(".{0,12}", 0..60),
            sort in any::<bool>(),
        ) {
            if sort {
                nodes.sort_by(|a, b| a.id.cmp(&b.id));
            }
            let tasks: Vec<&str> = tasks.iter().map(String::as_str).collect();
            for s in Strategy::ALL {
                let first = s.assign(&nodes, &tasks);
                let expected = if nodes.is_empty() { 0 } else { tasks.len() };
                prop_assert_eq!(first.len(), expected, "{}", s);
                prop_assert!(first.iter().all(|&i| i < nodes.len()), "{}", s);
                prop_assert_eq!(&first, &s.assign(&nodes, &tasks), "{}", s);
            }
        }
    }
}
