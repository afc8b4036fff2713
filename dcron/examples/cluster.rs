//! Three nodes in one process on the embedded memory registry run a dozen
//! tasks; after ten seconds one node stops and the others take over its
//! tasks. Ends by itself after about twenty seconds.
//!
//! Run it with `cargo run --example cluster`.

use std::time::Duration;

use dcron::{Dcron, MemoryRegistry, Strategy, TaskContext, TaskMeta};

fn line(node: &str, ctx: &TaskContext, kind: &str) {
    println!(
        "{}  {node}  runs {:<14} ({kind})",
        ctx.scheduled().format("%H:%M:%S"),
        ctx.name()
    );
}

#[tokio::main]
async fn main() -> dcron::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    // One registry shared by every node: the zero-setup default.
    let registry = MemoryRegistry::new();
    let mut nodes = Vec::new();
    for id in ["node-1", "node-2", "node-3"] {
        let node = Dcron::builder(registry.clone())
            .node_id(id)
            .strategy(Strategy::Consistent)
            .task_handler(move |ctx: TaskContext| async move {
                line(id, &ctx, &format!("dynamic, payload {}", ctx.payload()));
                Ok(())
            })
            .error_handler(|meta, err| eprintln!("task {} failed: {err}", meta.name))
            .build()?;
        // Static tasks: defined in code on every node, run by exactly one.
        for i in 1..=9 {
            node.add_func(
                &format!("report-{i}"),
                "*/2 * * * * *",
                move |ctx: TaskContext| async move {
                    line(id, &ctx, "static");
                    Ok(())
                },
            )
            .await?;
        }
        node.start().await?;
        nodes.push(node);
    }

    // Dynamic tasks: stored in the registry, run by the task handler.
    for (name, cron) in [
        ("invoice-sync", "*/3 * * * * *"),
        ("cache-warmup", "*/4 * * * * *"),
        ("audit", "*/5 * * * * *"),
    ] {
        nodes[0]
            .add_task_meta(
                TaskMeta::new(name, cron).with_payload(format!("{{\"job\":\"{name}\"}}")),
            )
            .await?;
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    print_owners(&nodes, "ownership");
    tokio::time::sleep(Duration::from_secs(9)).await;

    let leaving = nodes.pop().expect("three nodes");
    println!(
        "\n--- stopping node-3, which owned {:?} ---\n",
        leaving.my_running_tasks()
    );
    leaving.stop().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    print_owners(&nodes, "ownership after node-3 left");
    tokio::time::sleep(Duration::from_secs(9)).await;

    for node in &nodes {
        node.stop().await?;
    }
    println!("\ndone");
    Ok(())
}

fn print_owners(nodes: &[Dcron], title: &str) {
    println!("\n--- {title} ---");
    for node in nodes {
        println!("{}: {}", node.node_id(), node.my_running_tasks().join(", "));
    }
    println!();
}
