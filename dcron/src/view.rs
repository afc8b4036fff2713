//! What a node knows of the cluster, and who owns which task in it.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap;
use std::sync::Arc;

use crate::node::{Node, NodeStatus};
use crate::strategy::Assigner;
use crate::task::TaskMeta;

/// The registry's content as last seen by a node.
#[derive(Debug, Default, Clone)]
pub(crate) struct View {
    pub nodes: BTreeMap<String, Node>,
    pub tasks: BTreeMap<String, Arc<TaskMeta>>,
    pub tombstones: BTreeSet<String>,
}

/// Who owns each live (not tombstoned) task: task name → owner node id.
///
/// Only `working` nodes own tasks. A dynamic task may go to any of them
/// that has a task handler; a static task only to those that define it. Tasks with the
/// same set of eligible nodes are assigned together, so strategies that
/// look at the whole task list (Range, RoundRobin) see a consistent one.
/// When a name is both static and dynamic, the static definition wins.
///
/// `local` gives one node's static task names directly (a node knows its
/// own better than the registry's copy of its record).
pub(crate) fn assign<'v>(
    view: &'v View,
    local: Option<(&str, Vec<&'v str>)>,
    assigner: &dyn Assigner,
) -> Vec<(&'v str, &'v str)> {
    let working: Vec<&Node> = view
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Working)
        .collect();
    let mut owners = Vec::new();
    if working.is_empty() {
        return owners;
    }
    // Static task name → the working nodes defining it.
    let mut definers: FxHashMap<&str, NodeSet> = FxHashMap::default();
    let mut local = local;
    for (i, node) in working.iter().enumerate() {
        let names: Vec<&'v str> = match &mut local {
            Some((id, names)) if *id == node.id => std::mem::take(names),
            _ => node.static_tasks.iter().map(String::as_str).collect(),
        };
        for name in names {
            if !view.tombstones.contains(name) {
                definers
                    .entry(name)
                    .or_insert_with(|| NodeSet::empty(working.len()))
                    .insert(i);
            }
        }
    }
    // Eligible node set → its tasks; dynamic tasks go to the nodes that
    // run them (those with a task handler).
    let mut handlers = NodeSet::empty(working.len());
    for (i, node) in working.iter().enumerate() {
        if node.dynamic_tasks {
            handlers.insert(i);
        }
    }
    let mut groups: FxHashMap<NodeSet, Vec<&str>> = FxHashMap::default();
    if !handlers.is_empty() {
        for name in view.tasks.keys() {
            if !view.tombstones.contains(name) && !definers.contains_key(name.as_str()) {
                groups.entry(handlers.clone()).or_default().push(name);
            }
        }
    }
    for (name, nodes) in definers {
        groups.entry(nodes).or_default().push(name);
    }
    for (set, mut tasks) in groups {
        tasks.sort_unstable();
        let members: Vec<&Node> = set.members().map(|i| working[i]).collect();
        // Assigners see nodes without their (possibly long) task lists.
        let light: Vec<Node> = members.iter().map(|n| n.clone_header()).collect();
        let picks = assigner.assign(&light, &tasks);
        for (task, pick) in tasks.into_iter().zip(picks) {
            if let Some(owner) = members.get(pick) {
                owners.push((task, owner.id.as_str()));
            }
        }
    }
    owners
}

/// A set of indices into the working nodes: a bit set for clusters of up
/// to 128 nodes (no allocation per task), a sorted list beyond.
#[derive(Clone, PartialEq, Eq, Hash)]
enum NodeSet {
    Bits(u128),
    List(Vec<usize>),
}

impl NodeSet {
    fn empty(nodes: usize) -> NodeSet {
        if nodes <= 128 {
            NodeSet::Bits(0)
        } else {
            NodeSet::List(Vec::new())
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            NodeSet::Bits(bits) => *bits == 0,
            NodeSet::List(list) => list.is_empty(),
        }
    }

    /// Inserts `i`; indices arrive in increasing order.
    fn insert(&mut self, i: usize) {
        match self {
            NodeSet::Bits(bits) => *bits |= 1u128 << i,
            NodeSet::List(list) => list.push(i),
        }
    }

    fn members(&self) -> Box<dyn Iterator<Item = usize> + '_> {
        match self {
            NodeSet::Bits(bits) => Box::new((0..128).filter(move |i| bits & (1u128 << i) != 0)),
            NodeSet::List(list) => Box::new(list.iter().copied()),
        }
    }
}

impl Node {
    /// A copy without the static task list.
    fn clone_header(&self) -> Node {
        Node {
            id: self.id.clone(),
            ip: self.ip.clone(),
            hostname: self.hostname.clone(),
            last_alive: self.last_alive,
            create_time: self.create_time,
            status: self.status,
            weight: self.weight,
            strategy: self.strategy.clone(),
            dynamic_tasks: self.dynamic_tasks,
            static_tasks: Vec::new(),
        }
    }
}

/// Who owns each live task of a cluster, as its nodes compute it: task
/// name → owner node id. For tools that show ownership from outside (the
/// `dcron` command); `assigner` must be the cluster's strategy.
pub fn ownership(
    nodes: &[Node],
    tasks: &[TaskMeta],
    tombstones: &[String],
    assigner: &dyn Assigner,
) -> BTreeMap<String, String> {
    let view = View {
        nodes: nodes.iter().map(|n| (n.id.clone(), n.clone())).collect(),
        tasks: tasks
            .iter()
            .map(|t| (t.name.clone(), Arc::new(t.clone())))
            .collect(),
        tombstones: tombstones.iter().cloned().collect(),
    };
    assign(&view, None, assigner)
        .into_iter()
        .map(|(t, n)| (t.to_string(), n.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Strategy;

    fn node(id: &str, status: NodeStatus, statics: &[&str]) -> Node {
        Node {
            id: id.into(),
            ip: String::new(),
            hostname: String::new(),
            last_alive: 0,
            create_time: 0,
            status,
            weight: 1,
            strategy: None,
            dynamic_tasks: true,
            static_tasks: statics.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn only_working_definers_own_static_tasks() {
        let mut view = View::default();
        for n in [
            node("a", NodeStatus::Working, &["s1", "both"]),
            node("b", NodeStatus::Working, &["both"]),
            node("c", NodeStatus::Starting, &["s1", "s3"]),
        ] {
            view.nodes.insert(n.id.clone(), n);
        }
        view.tasks
            .insert("d1".into(), Arc::new(TaskMeta::new("d1", "* * * * *")));
        view.tasks
            .insert("gone".into(), Arc::new(TaskMeta::new("gone", "* * * * *")));
        view.tombstones.insert("gone".into());
        for strategy in Strategy::ALL {
            let owners: BTreeMap<&str, &str> = assign(&view, None, &strategy).into_iter().collect();
            assert_eq!(owners.get("s1"), Some(&"a"), "{strategy:?}");
            assert!(!owners.contains_key("s3"), "no working node defines s3");
            assert!(!owners.contains_key("gone"), "tombstoned");
            assert!(matches!(owners.get("both"), Some(&"a") | Some(&"b")));
            assert!(matches!(owners.get("d1"), Some(&"a") | Some(&"b")));
        }
    }

    #[test]
    fn nobody_working_owns_nothing() {
        let mut view = View::default();
        view.nodes
            .insert("a".into(), node("a", NodeStatus::Leaving, &["s"]));
        view.tasks
            .insert("d".into(), Arc::new(TaskMeta::new("d", "* * * * *")));
        assert!(assign(&view, None, &Strategy::Consistent).is_empty());
    }

    proptest::proptest! {
        /// Every node computes the same owners: a node using its own
        /// static task list gets what the others get from its published
        /// record; owners are working nodes that may run the task; every
        /// live task with an eligible node has exactly one owner.
        #[test]
        fn every_node_computes_the_same_owners(
            specs in proptest::collection::vec((0u8..3, proptest::bool::ANY, proptest::collection::btree_set(0u8..12, 0..8)), 0..6),
            dynamic in proptest::collection::btree_set(0u8..12, 0..8),
            dead in proptest::collection::btree_set(0u8..12, 0..4),
            strategy in proptest::sample::select(Strategy::ALL.to_vec()),
        ) {
            let mut view = View::default();
            for (i, (status, handler, statics)) in specs.iter().enumerate() {
                let status = [NodeStatus::Starting, NodeStatus::Working, NodeStatus::Leaving][*status as usize];
                let names: Vec<String> = statics.iter().map(|t| format!("t{t}")).collect();
                let mut n = node(&format!("n{i}"), status, &[]);
                n.static_tasks = names;
                n.dynamic_tasks = *handler;
                view.nodes.insert(n.id.clone(), n);
            }
            for t in &dynamic {
                let name = format!("t{t}");
                view.tasks.insert(name.clone(), Arc::new(TaskMeta::new(name, "* * * * *")));
            }
            view.tombstones = dead.iter().map(|t| format!("t{t}")).collect();
            let global: BTreeMap<&str, &str> = assign(&view, None, &strategy).into_iter().collect();
            for n in view.nodes.values() {
                let local: Vec<&str> = n.static_tasks.iter().map(String::as_str).collect();
                let mine: BTreeMap<&str, &str> = assign(&view, Some((n.id.as_str(), local)), &strategy).into_iter().collect();
                proptest::prop_assert_eq!(&mine, &global);
            }
            for (task, owner) in &global {
                let o = &view.nodes[*owner];
                proptest::prop_assert_eq!(o.status, NodeStatus::Working);
                proptest::prop_assert!(!view.tombstones.contains(*task));
                let is_static = view.nodes.values().any(|n| n.status == NodeStatus::Working && n.defines(task));
                if is_static {
                    proptest::prop_assert!(o.defines(task));
                } else {
                    proptest::prop_assert!(o.dynamic_tasks && view.tasks.contains_key(*task));
                }
            }
            for t in 0u8..12 {
                let name = format!("t{t}");
                let eligible = !view.tombstones.contains(&name) && view.nodes.values().any(|n| {
                    n.status == NodeStatus::Working && (n.defines(&name) || (n.dynamic_tasks && view.tasks.contains_key(&name)))
                });
                proptest::prop_assert_eq!(global.contains_key(name.as_str()), eligible, "{}", name);
            }
        }
    }
}
