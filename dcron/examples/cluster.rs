//! Three nodes in one process on the embedded memory registry run nine
//! tasks. After a few seconds one node stops gracefully (the others take its
//! tasks at once), then another one crashes (its registration expires and
//! the survivor takes over, catching up the fires missed meanwhile). The
//! demo ends by itself after about twenty seconds with a check computed from
//! every run it saw: each fire time of each task ran exactly once, with no
//! gap.
//!
//! Run it with `cargo run --example cluster`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcron::{Dcron, MemoryRegistry, Strategy, TaskContext, TaskMeta};

/// Every run: task → fire time → (node, whether it ran late: a catch-up).
type Ledger = Arc<Mutex<BTreeMap<String, BTreeMap<i64, Vec<(&'static str, bool)>>>>>;

/// Static tasks (code on every node) and dynamic ones (in the registry),
/// with their period in seconds.
const STATIC: [(&str, i64); 6] = [
    ("report-a", 2),
    ("report-b", 2),
    ("report-c", 2),
    ("report-d", 2),
    ("report-e", 2),
    ("report-f", 2),
];
const DYNAMIC: [(&str, i64); 3] = [("invoice-sync", 3), ("cache-warmup", 4), ("audit", 5)];

/// How long each phase runs.
#[derive(Clone, Copy)]
struct Pace {
    steady: Duration,
    after_stop: Duration,
    after_crash: Duration,
}

#[tokio::main]
async fn main() -> dcron::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let pace = Pace {
        steady: Duration::from_secs(6),
        after_stop: Duration::from_secs(5),
        after_crash: Duration::from_secs(8),
    };
    let check = run(pace, true).await?;
    println!("\n{check}");
    if !check.ok() {
        std::process::exit(1);
    }
    Ok(())
}

/// What the demo observed, checked.
struct Check {
    fires: usize,
    duplicates: Vec<String>,
    gaps: Vec<String>,
    caught_up: usize,
}

impl Check {
    fn ok(&self) -> bool {
        self.fires > 0 && self.duplicates.is_empty() && self.gaps.is_empty()
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ok() {
            return write!(
                f,
                "check: {} fires, each ran once, no gap ({} caught up after the crash)",
                self.fires, self.caught_up
            );
        }
        write!(
            f,
            "check FAILED: {} fires; ran twice: {:?}; gaps: {:?}",
            self.fires, self.duplicates, self.gaps
        )
    }
}

async fn node(
    id: &'static str,
    registry: &MemoryRegistry,
    ledger: &Ledger,
) -> dcron::Result<Dcron> {
    let record = |ledger: Ledger, id: &'static str| {
        move |ctx: TaskContext| {
            let late = chrono::Utc::now().timestamp_millis() - ctx.fire_time > 1_000;
            ledger
                .lock()
                .expect("ledger")
                .entry(ctx.name().to_string())
                .or_default()
                .entry(ctx.fire_time)
                .or_default()
                .push((id, late));
            async { Ok(()) }
        }
    };
    let node = Dcron::builder(registry.clone())
        .node_id(id)
        .strategy(Strategy::Consistent)
        // Short liveness so the crash is noticed within the demo.
        .node_ttl(Duration::from_secs(3))
        .heartbeat(Duration::from_millis(500))
        .task_handler(record(ledger.clone(), id))
        .error_handler(|meta, err| eprintln!("task {} failed: {err}", meta.name))
        .build()?;
    for (name, period) in STATIC {
        node.add_func(
            name,
            &format!("*/{period} * * * * *"),
            record(ledger.clone(), id),
        )
        .await?;
    }
    node.start().await?;
    Ok(node)
}

/// Runs the three phases; `narrate` prints what happens.
async fn run(pace: Pace, narrate: bool) -> dcron::Result<Check> {
    let say = |text: String| {
        if narrate {
            println!("{text}");
        }
    };
    let registry = MemoryRegistry::new();
    let ledger = Ledger::default();
    let mut nodes = Vec::new();
    for id in ["node-1", "node-2", "node-3"] {
        nodes.push(node(id, &registry, &ledger).await?);
    }
    for (name, period) in DYNAMIC {
        nodes[0]
            .add_task_meta(
                TaskMeta::new(name, format!("*/{period} * * * * *"))
                    .with_payload(format!("{{\"job\":\"{name}\"}}")),
            )
            .await?;
    }
    let started = now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    say(format!(
        "three nodes own the nine tasks:\n{}",
        owners(&nodes)
    ));

    tokio::time::sleep(pace.steady).await;
    mid_second().await;
    say(summary("steady", &ledger, started, now()));
    let leaving = nodes.pop().expect("three nodes");
    say(format!(
        "\nnode-3 stops gracefully, handing over {}",
        leaving.owned_tasks().join(", ")
    ));
    leaving.stop().await?;
    let stopped = now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    say(owners(&nodes));

    tokio::time::sleep(pace.after_stop).await;
    // Away from the fire times: a crash just after a claim taken ahead of
    // its fire time would lose that fire (the claim lead, see the README).
    mid_second().await;
    say(summary("after the stop", &ledger, stopped, now()));
    let crashed = nodes.pop().expect("two nodes");
    say(format!(
        "\nnode-2 crashes (no goodbye) while owning {}",
        crashed.owned_tasks().join(", ")
    ));
    crashed.kill().await;
    let crash = now();

    tokio::time::sleep(pace.after_crash).await;
    say(summary("after the crash", &ledger, crash, now()));
    say(format!("node-1 now owns everything:\n{}", owners(&nodes)));
    for node in &nodes {
        node.stop().await?;
    }
    let ended = now();
    Ok(check(&ledger, started, ended))
}

/// Sleeps until the middle of a second: every fire time is on a whole one.
async fn mid_second() {
    let into = now().rem_euclid(1000);
    let wait = (1500 - into) % 1000;
    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
}

fn now() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn owners(nodes: &[Dcron]) -> String {
    nodes
        .iter()
        .map(|n| format!("  {}: {}", n.node_id(), n.owned_tasks().join(", ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs per node for fires in `[from, to)`.
fn summary(phase: &str, ledger: &Ledger, from: i64, to: i64) -> String {
    let mut per_node: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for fires in ledger.lock().expect("ledger").values() {
        for runs in fires.range(from..to).map(|(_, r)| r) {
            for (node, late) in runs {
                let entry = per_node.entry(node).or_default();
                entry.0 += 1;
                entry.1 += usize::from(*late);
            }
        }
    }
    let parts: Vec<String> = per_node
        .iter()
        .map(|(node, (runs, late))| match late {
            0 => format!("{node} {runs}"),
            late => format!("{node} {runs} ({late} caught up)"),
        })
        .collect();
    format!("  {phase}: runs per node: {}", parts.join(", "))
}

/// Every fire time of every task between the first and the last whole
/// period of the run ran exactly once.
fn check(ledger: &Ledger, started: i64, ended: i64) -> Check {
    let ledger = ledger.lock().expect("ledger");
    let mut out = Check {
        fires: 0,
        duplicates: Vec::new(),
        gaps: Vec::new(),
        caught_up: 0,
    };
    for (name, period) in STATIC.iter().chain(DYNAMIC.iter()) {
        let period_ms = period * 1000;
        let runs = ledger.get(*name);
        // Fires well inside the run: after the first second, before the stop.
        let first = (started + 1_000).div_euclid(period_ms) * period_ms + period_ms;
        let mut fire = first;
        while fire + 1_000 < ended {
            match runs.and_then(|r| r.get(&fire)).map(Vec::as_slice) {
                Some([(_, late)]) => {
                    out.fires += 1;
                    out.caught_up += usize::from(*late);
                }
                Some(more) if more.len() > 1 => out.duplicates.push(format!("{name}@{fire}")),
                _ => out.gaps.push(format!("{name}@{fire}")),
            }
            fire += period_ms;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo's closing check holds (shorter phases).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_fire_runs_once_through_a_stop_and_a_crash() {
        let pace = Pace {
            steady: Duration::from_secs(3),
            after_stop: Duration::from_secs(3),
            after_crash: Duration::from_secs(6),
        };
        let check = run(pace, false).await.expect("demo");
        assert!(check.ok(), "{check}");
        assert!(
            check.caught_up > 0,
            "the crash left fires to catch up: {check}"
        );
    }
}
