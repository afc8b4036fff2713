//! Configuration of a node: the options, checked and resolved (timing
//! defaults come from the backend) when the node is built.

use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;

use super::Dcron;
use crate::clock::{Clock, SystemClock};
use crate::engine::{CatchUp, ErrorHandler, Overlap};
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::strategy::{Assigner, Strategy};
use crate::task::{Task, TaskMeta, DEFAULT_MAX_PAYLOAD};

/// Default namespace.
pub const DEFAULT_NAMESPACE: &str = "dcron";

/// A node's timing, resolved and checked.
pub(super) struct Timing {
    pub ttl: Duration,
    pub heartbeat: Duration,
    pub reload: Duration,
}

/// Builds a [`Dcron`] node. Every option has a sensible default; timing
/// defaults come from the registry backend.
///
/// ```
/// use dcron::{Dcron, MemoryRegistry, Strategy};
///
/// let node = Dcron::builder(MemoryRegistry::new())
///     .namespace("billing")
///     .strategy(Strategy::Consistent)
///     .weight(2)
///     .task_handler(|ctx: dcron::TaskContext| async move {
///         println!("dynamic task {} payload {}", ctx.name(), ctx.payload());
///         Ok(())
///     })
///     .error_handler(|meta, err| eprintln!("{} failed: {err}", meta.name))
///     .build()
///     .expect("valid options");
/// # drop(node);
/// ```
pub struct Builder {
    pub(super) registry: Arc<dyn Registry>,
    pub(super) namespace: String,
    pub(super) assigner: Arc<dyn Assigner>,
    pub(super) strategy_name: String,
    pub(super) node_id: Option<String>,
    pub(super) ip: Option<String>,
    pub(super) weight: u32,
    pub(super) timezone: Tz,
    pub(super) task_handler: Option<Arc<dyn Task>>,
    pub(super) error_handler: Option<ErrorHandler>,
    pub(super) node_ttl: Option<Duration>,
    pub(super) heartbeat: Option<Duration>,
    pub(super) reload: Option<Duration>,
    pub(super) catch_up: CatchUp,
    pub(super) overlap: Overlap,
    pub(super) max_payload: usize,
    pub(super) drain_timeout: Duration,
    pub(super) clock: Arc<dyn Clock>,
}

impl Builder {
    pub(super) fn new(registry: Arc<dyn Registry>) -> Self {
        Builder {
            registry,
            namespace: DEFAULT_NAMESPACE.to_string(),
            assigner: Arc::new(Strategy::Consistent),
            strategy_name: Strategy::Consistent.to_string(),
            node_id: None,
            ip: None,
            weight: 1,
            timezone: Tz::UTC,
            task_handler: None,
            error_handler: None,
            node_ttl: None,
            heartbeat: None,
            reload: None,
            catch_up: CatchUp::default(),
            overlap: Overlap::default(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            drain_timeout: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
        }
    }

    /// Namespace every key lives under (default `dcron`). Nodes in two
    /// namespaces never see each other. Same alphabet as task names.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// A built-in assignment strategy (default [`Strategy::Consistent`]).
    /// Every node of a namespace must use the same one.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.assigner = Arc::new(strategy);
        self.strategy_name = strategy.to_string();
        self
    }

    /// A custom assignment.
    pub fn assigner(mut self, assigner: impl Assigner) -> Self {
        self.assigner = Arc::new(assigner);
        self.strategy_name = "custom".to_string();
        self
    }

    /// This node's id (default: a random UUID). Must be unique in the
    /// namespace; same alphabet as task names.
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node_id = Some(id.into());
        self
    }

    /// Address published with the node (informational; default: the
    /// host's outbound address, else 127.0.0.1).
    pub fn ip(mut self, ip: impl Into<String>) -> Self {
        self.ip = Some(ip.into());
        self
    }

    /// Relative capacity for [`Strategy::Weighted`] (default 1; 0 counts as 1).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Time zone of cron expressions without a `CRON_TZ=` prefix (default UTC).
    pub fn timezone(mut self, tz: Tz) -> Self {
        self.timezone = tz;
        self
    }

    /// Runs every dynamic task (see [`Dcron::add_task_meta`]).
    pub fn task_handler(mut self, handler: impl Task) -> Self {
        self.task_handler = Some(Arc::new(handler));
        self
    }

    /// Called with every failed or panicked run (default: log an error).
    pub fn error_handler(
        mut self,
        handler: impl Fn(&TaskMeta, &Error) + Send + Sync + 'static,
    ) -> Self {
        self.error_handler = Some(Arc::new(handler));
        self
    }

    /// How long the node stays registered without heartbeats; also how
    /// long the cluster takes to notice a crashed node.
    pub fn node_ttl(mut self, ttl: Duration) -> Self {
        self.node_ttl = Some(ttl);
        self
    }

    /// How often liveness is extended (must be under the TTL).
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = Some(every);
        self
    }

    /// How often the whole state is reloaded as a safety net for lost
    /// change events.
    pub fn reload_interval(mut self, every: Duration) -> Self {
        self.reload = Some(every);
        self
    }

    /// What to do about fires missed while no node owned a task
    /// (default: run the latest one if under a minute old).
    pub fn catch_up(mut self, policy: CatchUp) -> Self {
        self.catch_up = policy;
        self
    }

    /// What to do when a fire comes while the task still runs here
    /// (default: skip it).
    pub fn overlap(mut self, policy: Overlap) -> Self {
        self.overlap = policy;
        self
    }

    /// Largest accepted dynamic task payload in bytes (default 64 KiB).
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How long `stop` waits for running tasks (default 30 s).
    pub fn drain_timeout(mut self, limit: Duration) -> Self {
        self.drain_timeout = limit;
        self
    }

    /// The wall clock used to decide when to fire (tests).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Checks the options and builds the node (not started).
    pub fn build(self) -> Result<Dcron> {
        let bad = |what: &str, e: Error| Error::InvalidConfig(format!("{what}: {e}"));
        crate::task::validate_task_name(&self.namespace).map_err(|e| bad("namespace", e))?;
        if let Some(id) = &self.node_id {
            crate::task::validate_task_name(id).map_err(|e| bad("node id", e))?;
        }
        let timing = self.registry.timing();
        let ttl = self.node_ttl.unwrap_or(timing.node_ttl);
        let heartbeat = self
            .heartbeat
            .unwrap_or_else(|| timing.heartbeat.min(ttl / 3));
        let reload = self.reload.unwrap_or(timing.reload);
        if heartbeat.is_zero() || heartbeat >= ttl {
            return Err(Error::InvalidConfig(format!(
                "heartbeat ({heartbeat:?}) must be positive and shorter than the node TTL ({ttl:?})"
            )));
        }
        if reload.is_zero() {
            return Err(Error::InvalidConfig(
                "reload interval must be positive".into(),
            ));
        }
        let timing = Timing {
            ttl,
            heartbeat,
            reload,
        };
        Ok(Dcron::from_builder(self, timing))
    }
}
