//! dcron: distributed cron.
mod error;
pub mod node;
pub mod registry;
pub mod strategy;
pub mod task;

pub use error::{BoxError, Error, Result};
pub use node::{Node, NodeStatus};
pub use registry::{MemoryRegistry, Registry};
pub use strategy::{Assigner, Strategy};
pub use task::{TaskContext, TaskMeta};
