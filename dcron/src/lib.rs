//! dcron: distributed cron.
mod builder;
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

pub use builder::{Builder, DEFAULT_NAMESPACE};
pub use dcron::{shutdown_signal, Dcron};
pub use engine::{CatchUp, ErrorHandler, Overlap};
pub use error::{BoxError, Error, Result};
pub use events::{Event, NodeEvent, TaskEvent};
pub use node::{Node, NodeStatus};
pub use registry::{MemoryRegistry, Registry};
pub use strategy::{Assigner, Strategy};
pub use task::{Task, TaskContext, TaskMeta, TaskResult};
pub use view::ownership;
