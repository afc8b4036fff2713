//! Distributed cron: every fire time of every task runs once in the
//! cluster, on the node the distribution strategy picks, and keeps running
//! when nodes come, go or crash.
//!
//! Nodes ([`Dcron`]) coordinate only through a [`Registry`]: Redis, etcd,
//! ZooKeeper or Consul (cargo features `redis`, `etcd`, `zookeeper`,
//! `consul`), or the in-process [`MemoryRegistry`].
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use dcron::{Dcron, MemoryRegistry, Strategy, TaskContext, TaskMeta};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> dcron::Result<()> {
//! let registry = MemoryRegistry::new(); // shared by every node of the cluster
//! let runs = Arc::new(AtomicUsize::new(0));
//! let counter = runs.clone();
//! let node = Dcron::builder(registry.clone())
//!     .namespace("billing")
//!     .strategy(Strategy::Consistent)
//!     .task_handler(move |ctx: TaskContext| {
//!         let counter = counter.clone();
//!         async move {
//!             println!("{} ({}) for {}", ctx.name(), ctx.payload(), ctx.scheduled());
//!             counter.fetch_add(1, Ordering::SeqCst);
//!             Ok(())
//!         }
//!     })
//!     .build()?;
//! // A static task, defined in code on the nodes that add it.
//! node.add_func("heartbeat-report", "*/5 * * * * *", |_ctx: TaskContext| async { Ok(()) })
//!     .await?;
//! // A dynamic task, stored in the registry and run by the task handler.
//! node.add_task_meta(TaskMeta::new("sync", "* * * * * *").with_payload("tenant-42"))
//!     .await?;
//! node.start().await?;
//! while runs.load(Ordering::SeqCst) == 0 {
//!     tokio::time::sleep(std::time::Duration::from_millis(50)).await;
//! }
//! node.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Every fire time a node owns either runs once in the cluster or is
//! reported as missed ([`Error::FireMissed`], [`Dcron::missed_fires`]);
//! claims are idempotent per node incarnation, so a lost answer never turns
//! into a lost or a second run. The full semantics follow.
//!
#![doc = include_str!("../docs/semantics.md")]
mod admin;
mod backoff;
pub mod clock;
mod dcron;
mod engine;
mod error;
mod events;
pub mod node;
pub mod registry;
pub mod schedule;
pub mod strategy;
pub mod task;
mod view;

pub use admin::{Admin, NamespaceSnapshot};
pub use dcron::{shutdown_signal, Builder, Dcron, DEFAULT_NAMESPACE};
pub use engine::{CatchUp, ErrorHandler, Overlap};
pub use error::{BoxError, Error, MissReason, RegistryErrorKind, Result};
pub use events::{Event, NodeEvent, TaskEvent};
pub use node::{Node, NodeStatus};
pub use registry::{MemoryRegistry, Registry};
pub use strategy::{Assigner, ParseStrategyError, Strategy};
pub use task::{Task, TaskContext, TaskMeta, TaskResult};
pub use view::ownership;

/// Every Rust block of the README, compiled as a doc test (with every
/// backend, as the test suite runs), so the README's examples build.
#[cfg(all(
    doctest,
    feature = "redis",
    feature = "etcd",
    feature = "zookeeper",
    feature = "consul"
))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
