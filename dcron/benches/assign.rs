//! Assignment benchmark: time of `Strategy::assign` for 100 000 tasks on 3,
//! 30 and 300 nodes, for every built-in strategy.
//!
//! `cargo bench -p dcron --bench assign`. Before timing, one line per
//! (strategy, nodes) reports the balance (max tasks per node over the mean)
//! and the share of tasks that change owner when one more node joins.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dcron::{Assigner, Node, NodeStatus, Strategy};

const TASKS: usize = 100_000;
const NODE_COUNTS: [usize; 3] = [3, 30, 300];

fn node(i: usize) -> Node {
    Node {
        id: format!("node-{i:03}"),
        ip: String::new(),
        hostname: String::new(),
        last_alive: 0,
        create_time: 0,
        status: NodeStatus::Working,
        weight: 1,
        strategy: None,
        dynamic_tasks: true,
        static_tasks: Vec::new(),
    }
}

/// Nodes `node-000` .. sorted by id.
fn nodes(count: usize) -> Vec<Node> {
    let mut nodes: Vec<Node> = (0..count).map(node).collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    nodes
}

/// `task-{i}` names, sorted.
fn task_names() -> Vec<String> {
    let mut names: Vec<String> = (0..TASKS).map(|i| format!("task-{i}")).collect();
    names.sort_unstable();
    names
}

fn balance(owners: &[usize], nodes: usize) -> f64 {
    let mut counts = vec![0usize; nodes];
    for &o in owners {
        counts[o] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    max / (owners.len() as f64 / nodes as f64)
}

/// Share of tasks whose owner (by id) changes when node `count` joins.
fn moved_on_join(strategy: Strategy, count: usize, tasks: &[&str]) -> f64 {
    let before_nodes = nodes(count);
    let after_nodes = nodes(count + 1);
    let before = strategy.assign(&before_nodes, tasks);
    let after = strategy.assign(&after_nodes, tasks);
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| before_nodes[**b].id != after_nodes[**a].id)
        .count();
    moved as f64 / tasks.len() as f64
}

fn report(tasks: &[&str]) {
    for count in NODE_COUNTS {
        let ns = nodes(count);
        for strategy in Strategy::ALL {
            let owners = strategy.assign(&ns, tasks);
            println!(
                "assign strategy={strategy} nodes={count} tasks={} balance_max_over_mean={:.2} moved_on_join={:.3}",
                tasks.len(),
                balance(&owners, count),
                moved_on_join(strategy, count, tasks),
            );
        }
    }
}

fn bench_assign(c: &mut Criterion) {
    let names = task_names();
    let tasks: Vec<&str> = names.iter().map(String::as_str).collect();
    report(&tasks);
    for count in NODE_COUNTS {
        let ns = nodes(count);
        let mut group = c.benchmark_group(format!("assign/nodes={count}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for strategy in Strategy::ALL {
            group.bench_with_input(
                BenchmarkId::from_parameter(strategy),
                &strategy,
                |b, strategy| b.iter(|| strategy.assign(black_box(&ns), black_box(&tasks))),
            );
        }
        group.finish();
    }
}

criterion_group!(benches, bench_assign);
criterion_main!(benches);
