//! A cluster node: the [`Dcron`] handle and the state its parts share.
//! One module a concept: the task API ([`tasks`]), queries, start and stop
//! ([`lifecycle`]), the node's claim to its id ([`identity`]), the
//! background loops ([`loops`]), the view kept up to date from the watch
//! and reloads ([`upkeep`]), which tasks this node owns ([`ownership`]) and
//! the catch-up of fires missed by the tasks it takes over ([`catch_up`]).

mod builder;
mod catch_up;
mod identity;
mod lifecycle;
mod loops;
mod ownership;
mod queries;
mod shutdown;
mod tasks;
mod upkeep;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::clock::Clock;
use crate::engine::{CatchUp, Engine, EngineConfig, Job};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::node::{Node, NodeStatus};
use crate::registry::Registry;
use crate::schedule::Schedule;
use crate::strategy::Assigner;
use crate::task::{Task, TaskContext, TaskResult};
use crate::view::View;

pub use builder::{Builder, DEFAULT_NAMESPACE};
pub use shutdown::shutdown_signal;

/// Bound on any single registry call made by the node's background loops.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// One node of a dcron cluster.
///
/// Cheap to clone: clones are handles to the same node.
///
/// ```
/// use std::time::Duration;
/// use dcron::{Dcron, MemoryRegistry, TaskContext};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dcron::Result<()> {
/// let registry = MemoryRegistry::new();
/// let node = Dcron::builder(registry).node_id("node-1").build()?;
/// node.add_func("report", "*/5 * * * * *", |ctx: TaskContext| async move {
///     println!("{} for {}", ctx.name(), ctx.scheduled());
///     Ok(())
/// })
/// .await?;
/// node.start().await?;
/// assert_eq!(node.owned_tasks(), vec!["report".to_string()]);
/// node.stop().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Dcron {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Arc<dyn Registry>,
    ns: String,
    /// The task writes (shared with tools that run no node).
    admin: Admin,
    assigner: Arc<dyn Assigner>,
    timezone: chrono_tz::Tz,
    ttl: Duration,
    heartbeat: Duration,
    reload: Duration,
    catch_up: CatchUp,
    drain_timeout: Duration,
    clock: Arc<dyn Clock>,
    task_handler: Arc<dyn Task>,
    engine: Arc<Engine>,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    dirty: Notify,
    lifecycle: tokio::sync::Mutex<Option<Running>>,
}

struct State {
    /// This node's record, without its static task list (see `record`).
    me: Node,
    statics: BTreeMap<String, Job>,
    /// The static task list changed since it was last published.
    publish_statics: bool,
    view: View,
    /// Whether `view.tombstones` reflects the registry (it does once loaded).
    tombstones_known: bool,
    schedules: HashMap<String, Weak<Schedule>>,
}

impl State {
    /// This node's record as published, static task list included.
    fn record(&self) -> Node {
        Node {
            static_tasks: self.statics.keys().cloned().collect(),
            ..self.me.clone()
        }
    }
}

struct Running {
    shutdown: watch::Sender<bool>,
    loops: Vec<JoinHandle<()>>,
}

impl Dcron {
    /// Starts configuring a node on `registry`.
    pub fn builder(registry: impl Registry) -> Builder {
        Builder::new(Arc::new(registry))
    }

    /// Starts configuring a node on a shared registry handle.
    pub fn builder_shared(registry: Arc<dyn Registry>) -> Builder {
        Builder::new(registry)
    }

    /// The node `b` describes, with its timing resolved and checked.
    fn from_builder(b: Builder, timing: builder::Timing) -> Dcron {
        let builder::Timing {
            ttl,
            heartbeat,
            reload,
        } = timing;
        let node_id = b
            .node_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let me = Node {
            id: node_id.clone(),
            ip: b.ip.unwrap_or_else(local_ip),
            hostname: hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            last_alive: 0,
            create_time: 0,
            status: NodeStatus::Starting,
            weight: b.weight,
            strategy: Some(b.strategy_name.clone()),
            dynamic_tasks: b.task_handler.is_some(),
            static_tasks: Vec::new(),
        };
        let engine = Engine::new(EngineConfig {
            registry: b.registry.clone(),
            ns: b.namespace.clone(),
            node_id,
            clock: b.clock.clone(),
            overlap: b.overlap,
            catch_up: b.catch_up,
            error_handler: b.error_handler,
        });
        let task_handler = b.task_handler.unwrap_or_else(|| Arc::new(no_task_handler));
        Dcron {
            inner: Arc::new(Inner {
                admin: Admin::unchecked(b.registry.clone(), b.namespace.clone())
                    .with_max_payload(b.max_payload)
                    .with_timezone(b.timezone),
                registry: b.registry,
                ns: b.namespace,
                assigner: b.assigner,
                timezone: b.timezone,
                ttl,
                heartbeat,
                reload,
                catch_up: b.catch_up,
                drain_timeout: b.drain_timeout,
                clock: b.clock,
                task_handler,
                engine,
                state: Mutex::new(State {
                    me,
                    statics: BTreeMap::new(),
                    publish_statics: false,
                    view: View::default(),
                    tombstones_known: false,
                    schedules: HashMap::new(),
                }),
                events: broadcast::channel(1024).0,
                dirty: Notify::new(),
                lifecycle: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> String {
        self.inner.lock().me.id.clone()
    }

    /// The registry this node coordinates through.
    pub fn registry(&self) -> Arc<dyn Registry> {
        self.inner.registry.clone()
    }

    /// The namespace this node works in.
    pub fn namespace(&self) -> &str {
        &self.inner.ns
    }
}

async fn no_task_handler(ctx: TaskContext) -> TaskResult {
    Err(format!(
        "dynamic task `{}` fired but the node has no task_handler; set one with Builder::task_handler",
        ctx.name()
    )
    .into())
}

/// Parses `cron`, sharing one parsed schedule between equal expressions.
fn schedule_in(
    cache: &mut HashMap<String, Weak<Schedule>>,
    cron: &str,
    timezone: chrono_tz::Tz,
) -> Result<Arc<Schedule>> {
    if let Some(s) = cache.get(cron).and_then(Weak::upgrade) {
        return Ok(s);
    }
    let schedule = Arc::new(Schedule::parse(cron, timezone)?);
    if cache.len() >= 1024 {
        cache.retain(|_, s| s.strong_count() > 0);
    }
    cache.insert(cron.to_string(), Arc::downgrade(&schedule));
    Ok(schedule)
}

/// The address of the interface used for outbound traffic (no packet is
/// sent), or 127.0.0.1.
fn local_ip() -> String {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".to_string())
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No critical section can panic half-way (only map updates).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a registry call with the node's bound.
    async fn call<T>(&self, what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                what: format!("{what} on the {} registry", self.registry.backend()),
                after: CALL_TIMEOUT,
            }),
        }
    }

    /// Parses `cron`, sharing one parsed schedule between equal expressions.
    fn schedule(&self, cron: &str) -> Result<Arc<Schedule>> {
        schedule_in(&mut self.lock().schedules, cron, self.timezone)
    }

    fn emit(&self, event: Event) {
        // Nobody subscribed is fine.
        let _ = self.events.send(event);
    }
}
