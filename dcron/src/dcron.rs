//! A cluster node: registration, the view of the cluster, ownership, and
//! the task API.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;

use crate::builder::Builder;
use crate::clock::Clock;
use crate::engine::{CatchUp, Engine, EngineConfig, Job};
use crate::error::{Error, Result};
use crate::events::{Event, NodeEvent, TaskEvent};
use crate::node::{Node, NodeStatus};
use crate::registry::{Registry, WatchEvent, WatchReceiver};
use crate::schedule::Schedule;
use crate::strategy::Assigner;
use crate::task::{validate_task_name, Task, TaskContext, TaskMeta, TaskResult};
use crate::view::{self, View};

/// Bound on any single registry call made by the node's background loops.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest pause between retries of a failing background operation.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

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
/// assert_eq!(node.my_running_tasks(), vec!["report".to_string()]);
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
    assigner: Arc<dyn Assigner>,
    timezone: chrono_tz::Tz,
    ttl: Duration,
    heartbeat: Duration,
    reload: Duration,
    catch_up: CatchUp,
    max_payload: usize,
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

    pub(crate) fn from_builder(
        b: Builder,
        ttl: Duration,
        heartbeat: Duration,
        reload: Duration,
    ) -> Dcron {
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
                registry: b.registry,
                ns: b.namespace,
                assigner: b.assigner,
                timezone: b.timezone,
                ttl,
                heartbeat,
                reload,
                catch_up: b.catch_up,
                max_payload: b.max_payload,
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

    // ----- static tasks -------------------------------------------------

    /// Adds a static task: defined in code on this node, owned only by
    /// nodes that define it. Fails with [`Error::TaskDeleted`] if the name
    /// carries a tombstone and [`Error::TaskExists`] if it is defined.
    pub async fn add_task(&self, name: &str, cron: &str, task: impl Task) -> Result<()> {
        self.add_static(name, cron, Arc::new(task), false, false)
            .await
    }

    /// [`add_task`](Self::add_task) for an async closure.
    pub async fn add_func<F, Fut>(&self, name: &str, cron: &str, f: F) -> Result<()>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        self.add_task(name, cron, f).await
    }

    /// A static task that runs once in the whole cluster, ever, then is
    /// marked deleted.
    pub async fn add_one_shot_task(&self, name: &str, cron: &str, task: impl Task) -> Result<()> {
        self.add_static(name, cron, Arc::new(task), true, false)
            .await
    }

    /// [`add_one_shot_task`](Self::add_one_shot_task) for an async closure.
    pub async fn add_one_shot_func<F, Fut>(&self, name: &str, cron: &str, f: F) -> Result<()>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        self.add_one_shot_task(name, cron, f).await
    }

    /// Overwrites: clears the tombstone, the claim and any local
    /// definition of `name`, then adds the static task.
    pub async fn force_add_task(&self, name: &str, cron: &str, task: impl Task) -> Result<()> {
        self.add_static(name, cron, Arc::new(task), false, true)
            .await
    }

    /// [`force_add_task`](Self::force_add_task) for an async closure.
    pub async fn force_add_func<F, Fut>(&self, name: &str, cron: &str, f: F) -> Result<()>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        self.force_add_task(name, cron, f).await
    }

    /// Overwriting variant of [`add_one_shot_task`](Self::add_one_shot_task).
    pub async fn force_add_one_shot_task(
        &self,
        name: &str,
        cron: &str,
        task: impl Task,
    ) -> Result<()> {
        self.add_static(name, cron, Arc::new(task), true, true)
            .await
    }

    /// Overwriting variant of [`add_one_shot_func`](Self::add_one_shot_func).
    pub async fn force_add_one_shot_func<F, Fut>(&self, name: &str, cron: &str, f: F) -> Result<()>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        self.force_add_one_shot_task(name, cron, f).await
    }

    async fn add_static(
        &self,
        name: &str,
        cron: &str,
        body: Arc<dyn Task>,
        one_shot: bool,
        force: bool,
    ) -> Result<()> {
        validate_task_name(name)?;
        let schedule = self.inner.schedule(cron)?;
        if force {
            self.inner.forget_history(name).await?;
            self.inner.lock().statics.remove(name);
        } else {
            self.inner.check_not_deleted(name).await?;
            let st = self.inner.lock();
            if st.statics.contains_key(name) || st.view.tasks.contains_key(name) {
                return Err(Error::TaskExists(name.to_string()));
            }
        }
        let mut meta = TaskMeta::new(name, cron);
        meta.one_shot = one_shot;
        let job = Job {
            meta: Arc::new(meta),
            schedule,
            body,
        };
        let mut st = self.inner.lock();
        st.statics.insert(name.to_string(), job);
        st.publish_statics = true;
        drop(st);
        self.inner.dirty.notify_one();
        Ok(())
    }

    // ----- dynamic tasks ------------------------------------------------

    /// Adds a dynamic task: stored in the registry, seen by every node, run
    /// by the task handler of its owner. Nothing is written if the name,
    /// cron or payload is invalid.
    pub async fn add_task_meta(&self, meta: TaskMeta) -> Result<()> {
        self.inner.check_meta(&meta)?;
        self.inner.check_not_deleted(&meta.name).await?;
        if self.inner.lock().statics.contains_key(&meta.name) {
            return Err(Error::TaskExists(meta.name));
        }
        self.inner
            .registry
            .put_task(&self.inner.ns, &meta, false)
            .await
    }

    /// Overwrites: clears the tombstone and the claim of the name, then
    /// stores the definition (replacing any old one).
    pub async fn force_add_task_meta(&self, meta: TaskMeta) -> Result<()> {
        self.inner.check_meta(&meta)?;
        self.inner.forget_history(&meta.name).await?;
        self.inner
            .registry
            .put_task(&self.inner.ns, &meta, true)
            .await
    }

    // ----- deletion -----------------------------------------------------

    /// Writes a tombstone: the task stops on every node, and a plain
    /// `add_*` of the name fails with [`Error::TaskDeleted`], also after
    /// restarts, until [`reuse_deleted_task`](Self::reuse_deleted_task).
    pub async fn mark_task_deleted(&self, name: &str) -> Result<()> {
        validate_task_name(name)?;
        self.inner
            .registry
            .put_tombstone(&self.inner.ns, name)
            .await?;
        self.inner.apply(WatchEvent::TombstonePut(name.to_string()));
        Ok(())
    }

    /// Removes the tombstone so the task runs again.
    pub async fn reuse_deleted_task(&self, name: &str) -> Result<()> {
        validate_task_name(name)?;
        self.inner
            .registry
            .delete_tombstone(&self.inner.ns, name)
            .await?;
        self.inner
            .apply(WatchEvent::TombstoneDelete(name.to_string()));
        Ok(())
    }

    /// Removes every trace of the task: dynamic definition, tombstone,
    /// claim, and this node's static definition.
    pub async fn cleanup_task(&self, name: &str) -> Result<()> {
        validate_task_name(name)?;
        let (reg, ns) = (&self.inner.registry, self.inner.ns.as_str());
        reg.delete_task(ns, name).await?;
        reg.delete_tombstone(ns, name).await?;
        reg.delete_claim(ns, name).await?;
        let had_static = self.inner.lock().statics.remove(name).is_some();
        if had_static {
            self.inner.lock().publish_statics = true;
        }
        self.inner.apply(WatchEvent::TaskDelete(name.to_string()));
        self.inner
            .apply(WatchEvent::TombstoneDelete(name.to_string()));
        Ok(())
    }

    /// Wipes the namespace's dynamic tasks, tombstones and claims (for
    /// tests and resets). Static definitions in code stay.
    pub async fn force_cleanup_all_tasks(&self) -> Result<()> {
        self.inner.registry.clear(&self.inner.ns).await?;
        let mut st = self.inner.lock();
        st.view.tasks.clear();
        st.view.tombstones.clear();
        drop(st);
        self.inner.dirty.notify_one();
        Ok(())
    }

    // ----- lifecycle ----------------------------------------------------

    /// Registers (`starting`), loads the cluster state, starts watching,
    /// turns `working`, and returns. Fires begin right away.
    pub async fn start(&self) -> Result<()> {
        let inner = &self.inner;
        let mut lifecycle = inner.lifecycle.lock().await;
        if lifecycle.is_some() {
            return Err(Error::AlreadyRunning);
        }
        inner.wait_for_free_id().await?;
        let now = inner.clock.now_ms();
        let record = {
            let mut st = inner.lock();
            st.me.status = NodeStatus::Starting;
            // Tells this start's record from any other one of the same id.
            st.me.create_time = unique_create_time(now);
            st.me.last_alive = now;
            st.publish_statics = false;
            st.record()
        };
        inner
            .call(
                "register",
                inner.registry.register(&inner.ns, &record, inner.ttl),
            )
            .await?;
        let watch = match inner.join().await {
            Ok(watch) => watch,
            Err(err) => {
                // Leave nothing half-registered behind.
                let _ = inner.registry.unregister(&inner.ns, &record.id).await;
                inner.lock().me.status = NodeStatus::Starting;
                return Err(err);
            }
        };
        let record = inner.lock().record();
        inner.apply(WatchEvent::NodePut(record.clone()));
        let mut incarnation = uuid::Uuid::new_v4().simple().to_string();
        incarnation.truncate(16);
        inner.engine.resume(&format!("{}/{incarnation}", record.id));
        inner.reconcile().await;

        let (shutdown, stop_rx) = watch::channel(false);
        let loops = vec![
            tokio::spawn(inner.engine.clone().run()),
            tokio::spawn(heartbeat_loop(self.inner.clone(), stop_rx.clone())),
            tokio::spawn(watch_loop(self.inner.clone(), watch, stop_rx.clone())),
            tokio::spawn(reload_loop(self.inner.clone(), stop_rx.clone())),
            tokio::spawn(reconcile_loop(self.inner.clone(), stop_rx)),
        ];
        *lifecycle = Some(Running { shutdown, loops });
        tracing::info!(node = %self.node_id(), ns = %inner.ns, "node working");
        Ok(())
    }

    /// Publishes `leaving` (others take over at once), stops firing, waits
    /// for running tasks (up to the drain timeout), and unregisters.
    pub async fn stop(&self) -> Result<()> {
        let inner = &self.inner;
        let Some(running) = inner.lifecycle.lock().await.take() else {
            return Err(Error::NotRunning);
        };
        let record = {
            let mut st = inner.lock();
            st.me.status = NodeStatus::Leaving;
            st.record()
        };
        if let Err(err) = inner
            .call(
                "update node",
                inner.registry.update_node(&inner.ns, &record),
            )
            .await
        {
            tracing::warn!(%err, "could not publish `leaving`; others take over after the TTL");
        }
        inner.engine.stop();
        let _ = running.shutdown.send(true);
        if !inner.engine.drain(inner.drain_timeout).await {
            tracing::warn!(
                running = inner.engine.running(),
                "drain timeout: leaving tasks running"
            );
        }
        let unregistered = inner
            .call(
                "unregister",
                inner.registry.unregister(&inner.ns, &record.id),
            )
            .await;
        for handle in running.loops {
            handle.abort();
        }
        inner.engine.reset();
        {
            let mut st = inner.lock();
            st.me.status = NodeStatus::Starting;
            st.view.nodes.remove(&record.id);
            // Not watched any more: re-read before trusting it again.
            st.tombstones_known = false;
        }
        tracing::info!(node = %record.id, "node stopped");
        unregistered
    }

    /// Simulates a crash (tests): stops firing and every background loop
    /// at once, without publishing `leaving` and without unregistering, so
    /// the registration is left to expire. Runs in flight are not awaited.
    #[doc(hidden)]
    pub async fn kill(&self) {
        if let Some(running) = self.inner.lifecycle.lock().await.take() {
            self.inner.engine.stop();
            for handle in running.loops {
                handle.abort();
            }
            self.inner.engine.reset();
        }
    }

    /// Whether the node is started.
    pub async fn is_running(&self) -> bool {
        self.inner.lifecycle.lock().await.is_some()
    }

    // ----- queries ------------------------------------------------------

    /// Live nodes, read from the registry.
    pub async fn nodes(&self) -> Result<Vec<Node>> {
        let mut nodes = self.inner.registry.nodes(&self.inner.ns).await?;
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    /// Every task name known to this node: its static tasks, those of the
    /// other nodes, and the dynamic ones (tombstoned ones included).
    pub fn all_tasks(&self) -> Vec<String> {
        let st = self.inner.lock();
        let mut names: BTreeSet<&str> = st.statics.keys().map(String::as_str).collect();
        names.extend(st.view.tasks.keys().map(String::as_str));
        for node in st.view.nodes.values() {
            names.extend(node.static_tasks.iter().map(String::as_str));
        }
        names.into_iter().map(str::to_string).collect()
    }

    /// The tasks this node owns now, sorted.
    pub fn my_running_tasks(&self) -> Vec<String> {
        self.inner.engine.owned()
    }

    /// Fires of tasks this node owned that did not run, since the node was
    /// built (each also logged at ERROR and passed to the error handler as
    /// [`Error::FireMissed`]).
    pub fn missed_fires(&self) -> u64 {
        self.inner.engine.missed()
    }

    /// A stream of node and task events as this node sees them.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
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

    fn check_meta(&self, meta: &TaskMeta) -> Result<()> {
        validate_task_name(&meta.name)?;
        if meta.payload.len() > self.max_payload {
            return Err(Error::PayloadTooLarge {
                size: meta.payload.len(),
                limit: self.max_payload,
            });
        }
        self.schedule(&meta.cron_format).map(drop)
    }

    async fn check_not_deleted(&self, name: &str) -> Result<()> {
        let known = self.lock().tombstones_known;
        if !known {
            let names = self.registry.tombstones(&self.ns).await?;
            let mut st = self.lock();
            st.view.tombstones = names.into_iter().collect();
            st.tombstones_known = true;
        }
        if self.lock().view.tombstones.contains(name) {
            return Err(Error::TaskDeleted(name.to_string()));
        }
        Ok(())
    }

    /// Clears the tombstone and the claim of `name` (force_* adds).
    async fn forget_history(&self, name: &str) -> Result<()> {
        self.registry.delete_tombstone(&self.ns, name).await?;
        self.registry.delete_claim(&self.ns, name).await?;
        self.apply(WatchEvent::TombstoneDelete(name.to_string()));
        Ok(())
    }

    fn emit(&self, event: Event) {
        // Nobody subscribed is fine.
        let _ = self.events.send(event);
    }

    /// Applies one change to the view, emitting the matching event.
    fn apply(&self, event: WatchEvent) {
        let mut st = self.lock();
        let out = match event {
            WatchEvent::NodePut(mut node) => {
                if node.id == st.me.id {
                    // Our own static tasks are known locally; don't keep a copy.
                    node.static_tasks = Vec::new();
                }
                // `last_alive` moves with heartbeats: not a change of the record.
                let ev = match st.view.nodes.get(&node.id) {
                    None => Some(NodeEvent::Put(node.clone())),
                    Some(old) if !old.same_record(&node) => Some(NodeEvent::Changed(node.clone())),
                    Some(_) => None,
                };
                st.view.nodes.insert(node.id.clone(), node);
                ev.map(Event::Node)
            }
            // A working node never drops itself from its own view: if the
            // registry expired it (an outage longer than the TTL), the
            // heartbeat re-registers it, and meanwhile it keeps its tasks
            // (others may take them too; claims keep each fire single).
            WatchEvent::NodeDelete(id) if id == st.me.id && st.me.status == NodeStatus::Working => {
                tracing::debug!(node = %id, "own registration gone from the registry; keeping own tasks until re-registered");
                None
            }
            WatchEvent::NodeDelete(id) => st
                .view
                .nodes
                .remove(&id)
                .map(|_| Event::Node(NodeEvent::Delete(id))),
            // An unchanged definition (every reload repeats them all) keeps
            // its shared copy, so the engine sees the very same task.
            WatchEvent::TaskPut(meta)
                if st
                    .view
                    .tasks
                    .get(&meta.name)
                    .is_some_and(|old| **old == meta) =>
            {
                None
            }
            WatchEvent::TaskPut(meta) => {
                let meta = Arc::new(meta);
                st.view.tasks.insert(meta.name.clone(), meta.clone());
                Some(Event::Task(TaskEvent::Put(meta)))
            }
            WatchEvent::TaskDelete(name) => st
                .view
                .tasks
                .remove(&name)
                .map(|_| Event::Task(TaskEvent::Delete(name))),
            WatchEvent::TombstonePut(name) => st
                .view
                .tombstones
                .insert(name.clone())
                .then_some(Event::Task(TaskEvent::Tombstoned(name))),
            WatchEvent::TombstoneDelete(name) => st
                .view
                .tombstones
                .remove(&name)
                .then_some(Event::Task(TaskEvent::Revived(name))),
            WatchEvent::Resync => None,
        };
        drop(st);
        if let Some(ev) = out {
            self.emit(ev);
            self.dirty.notify_one();
        }
    }

    /// Replaces the view with a full read of the registry. On error the
    /// last known view stays (a failed read never revives a tombstone).
    async fn reload_view(&self) -> Result<()> {
        let (reg, ns) = (&self.registry, self.ns.as_str());
        let nodes = self.call("list nodes", reg.nodes(ns)).await?;
        let tasks = self.call("list tasks", reg.tasks(ns)).await?;
        let tombstones = self.call("list tombstones", reg.tombstones(ns)).await?;
        let (old_nodes, old_tasks, old_tombstones) = {
            let st = self.lock();
            (
                st.view.nodes.keys().cloned().collect::<Vec<_>>(),
                st.view.tasks.keys().cloned().collect::<Vec<_>>(),
                st.view.tombstones.clone(),
            )
        };
        let new_nodes: BTreeSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        let new_tasks: BTreeSet<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
        let new_tombstones: BTreeSet<&String> = tombstones.iter().collect();
        for id in old_nodes
            .into_iter()
            .filter(|id| !new_nodes.contains(id.as_str()))
        {
            self.apply(WatchEvent::NodeDelete(id));
        }
        for name in old_tasks
            .into_iter()
            .filter(|n| !new_tasks.contains(n.as_str()))
        {
            self.apply(WatchEvent::TaskDelete(name));
        }
        for name in old_tombstones
            .iter()
            .filter(|n| !new_tombstones.contains(n))
        {
            self.apply(WatchEvent::TombstoneDelete(name.clone()));
        }
        for node in nodes {
            self.apply(WatchEvent::NodePut(node));
        }
        for meta in tasks {
            self.apply(WatchEvent::TaskPut(meta));
        }
        for name in tombstones {
            self.apply(WatchEvent::TombstonePut(name));
        }
        self.lock().tombstones_known = true;
        Ok(())
    }

    /// Recomputes which tasks this node owns and hands them to the engine;
    /// catches up missed fires of tasks it just took over.
    async fn reconcile(&self) {
        let (jobs, publish) = {
            let mut st = self.lock();
            let st = &mut *st;
            let me = st.me.id.as_str();
            // Our own static tasks as we know them now (the registry's copy may lag).
            let local: Vec<&str> = st.statics.keys().map(String::as_str).collect();
            let mut jobs = Vec::new();
            let mut invalid = Vec::new();
            for (name, owner) in view::assign(&st.view, Some((me, local)), &*self.assigner) {
                if owner != me {
                    continue;
                }
                if let Some(job) = st.statics.get(name) {
                    jobs.push(job.clone());
                } else if let Some(meta) = st.view.tasks.get(name) {
                    match schedule_in(&mut st.schedules, &meta.cron_format, self.timezone) {
                        Ok(schedule) => jobs.push(Job {
                            meta: meta.clone(),
                            schedule,
                            body: self.task_handler.clone(),
                        }),
                        Err(err) => invalid.push((name.to_string(), err)),
                    }
                }
            }
            for (task, err) in invalid {
                tracing::warn!(%task, %err, "skipping dynamic task with an invalid schedule");
            }
            let registered = st.view.nodes.contains_key(&st.me.id);
            let publish = (st.publish_statics && registered).then(|| {
                st.publish_statics = false;
                st.record()
            });
            (jobs, publish)
        };
        if let Some(record) = publish {
            match self
                .call("update node", self.registry.update_node(&self.ns, &record))
                .await
            {
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    self.lock().publish_statics = true;
                    tracing::warn!("could not publish the static task list; will retry");
                }
            }
        }
        let added = self.engine.set_jobs(jobs);
        if added.is_empty() {
            return;
        }
        if self.catch_up == CatchUp::Skip {
            return;
        }
        // Tasks that ran before and whose fires after their watermark came
        // due while nobody (or another node) owned them.
        let claims = match self
            .call("list claims", self.registry.claims(&self.ns))
            .await
        {
            Ok(claims) => claims.into_iter().collect::<HashMap<_, _>>(),
            Err(err) => {
                tracing::error!(%err, tasks = added.len(), "cannot read claims; fires missed by the tasks just taken over are not caught up");
                return;
            }
        };
        let now = self.clock.now_ms();
        let (mut tasks, mut fires) = (0usize, 0usize);
        for (name, schedule) in added {
            let Some(claim) = claims.get(&name) else {
                continue;
            };
            let missed = self.catch_up.missed(&schedule, claim.fire_time, now);
            if missed.is_empty() {
                continue;
            }
            tracing::debug!(task = %name, fires = missed.len(), first = %crate::clock::rfc3339(missed[0]), "catching up missed fires");
            tasks += 1;
            fires += missed.len();
            for fire_time in missed {
                self.engine.catch_up(&name, fire_time);
            }
        }
        if fires > 0 {
            tracing::info!(
                tasks,
                fires,
                "catching up fires missed while nobody ran these tasks"
            );
        }
    }

    /// Before registering: returns once no other live record holds this
    /// node's id, or fails with [`Error::NodeIdInUse`].
    ///
    /// A record of the id that shows signs of life (it changes, or its
    /// `last_alive` moves) fails the start at once, unless it is `leaving`
    /// (that node is stopping: its record goes soon). One that stays still
    /// may be the registration of a crashed earlier run of this node,
    /// which the registry drops within its TTL: the start waits up to
    /// [`STALE_WAIT_TTLS`] TTLs for it to go, then fails. The
    /// registration of this very handle before a crash (`kill`) is
    /// replaced without waiting.
    async fn wait_for_free_id(&self) -> Result<()> {
        let (id, before) = {
            let st = self.lock();
            let before = (st.me.create_time != 0).then(|| st.me.clone());
            (st.me.id.clone(), before)
        };
        let wait = self.ttl.saturating_mul(STALE_WAIT_TTLS);
        let poll = (self.ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let deadline = tokio::time::Instant::now() + wait;
        let mut first: Option<Node> = None;
        loop {
            let nodes = self
                .call("list nodes", self.registry.nodes(&self.ns))
                .await?;
            let Some(other) = nodes.into_iter().find(|n| n.id == id) else {
                if first.is_some() {
                    tracing::info!(node = %id, ns = %self.ns, "the other registration of this node id is gone; starting");
                }
                return Ok(());
            };
            if before.as_ref().is_some_and(|b| b.same_incarnation(&other)) {
                tracing::info!(node = %id, ns = %self.ns, "replacing this node's own registration left by a crash");
                return Ok(());
            }
            match &first {
                None => {
                    tracing::warn!(
                        node = %id,
                        ns = %self.ns,
                        host = %other.hostname,
                        ip = %other.ip,
                        created = other.create_time,
                        status = %other.status,
                        "node id is registered by another process; waiting up to {wait:?} for it to \
                         expire (a crashed earlier run of this node?)"
                    );
                    first = Some(other);
                }
                Some(seen) => {
                    // A node that is stopping (`leaving`) is on its way out:
                    // wait for it rather than fail.
                    let alive = other.status != NodeStatus::Leaving
                        && (!seen.same_record(&other)
                            || other.last_alive - seen.last_alive >= LIFE_SIGN_MS);
                    if alive {
                        return Err(Error::NodeIdInUse(id));
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::NodeIdInUse(id));
            }
            tokio::time::sleep(poll.min(deadline - now)).await;
        }
    }

    /// One heartbeat: extends the registration, then checks that the
    /// record under this node's id is its own (it decodes and carries this
    /// start's incarnation), repairing or re-registering it if need be.
    /// `reported` is whether the current trouble with the record was
    /// logged already (logged once, until the record is ours again).
    async fn beat(&self, reported: &mut bool) -> Result<Beat> {
        let id = self.lock().me.id.clone();
        // The trait has no single-record read: one listing per heartbeat,
        // concurrent with the heartbeat itself.
        let (alive, listed) = tokio::join!(
            self.call(
                "heartbeat",
                self.registry.heartbeat(&self.ns, &id, self.ttl),
            ),
            self.call("list nodes", self.registry.nodes(&self.ns)),
        );
        let alive = alive?;
        let stored = listed?.into_iter().find(|n| n.id == id);
        let me = self.lock().me.clone();
        match stored {
            Some(own) if own.same_incarnation(&me) => {
                if std::mem::take(reported) {
                    tracing::info!(node = %id, "own node record is readable again");
                }
                if !alive {
                    self.registration_lost(&id).await?;
                }
                Ok(Beat::Alive)
            }
            Some(other) if other.is_older_than(&me) => {
                tracing::error!(
                    node = %id,
                    ns = %self.ns,
                    host = %other.hostname,
                    ip = %other.ip,
                    created = other.create_time,
                    "node id is in use by another live process that registered it first; this \
                     process stands down: it stops running tasks and leaves the registration to \
                     the other one. Give each process its own node id"
                );
                Ok(Beat::StandDown)
            }
            Some(other) => {
                if !std::mem::replace(reported, true) {
                    tracing::error!(
                        node = %id,
                        ns = %self.ns,
                        host = %other.hostname,
                        ip = %other.ip,
                        created = other.create_time,
                        "node id was registered over this node by a newer process; taking it \
                         back (the newer one stands down). Give each process its own node id"
                    );
                }
                self.reregister().await?;
                Ok(Beat::Alive)
            }
            None if !alive => {
                self.registration_lost(&id).await?;
                Ok(Beat::Alive)
            }
            None => {
                // Registered, but the record does not decode (or is gone).
                if !std::mem::replace(reported, true) {
                    tracing::error!(node = %id, ns = %self.ns, "own node record unreadable/missing; rewriting it");
                }
                self.rewrite_record().await?;
                Ok(Beat::Alive)
            }
        }
    }

    /// The registry dropped this node's registration: registers again.
    async fn registration_lost(&self, id: &str) -> Result<()> {
        tracing::warn!(node = %id, "registration lost (expired or evicted); re-registering");
        self.reregister().await
    }

    /// Rewrites this node's record, keeping its liveness binding if the
    /// registry still has one (registers again otherwise).
    async fn rewrite_record(&self) -> Result<()> {
        let record = {
            let mut st = self.lock();
            st.publish_statics = false;
            st.record()
        };
        let written = async {
            let updated = self
                .call("update node", self.registry.update_node(&self.ns, &record))
                .await?;
            if !updated {
                self.call(
                    "register",
                    self.registry.register(&self.ns, &record, self.ttl),
                )
                .await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(err) = written {
            self.lock().publish_statics = true;
            return Err(err);
        }
        self.apply(WatchEvent::NodePut(record));
        Ok(())
    }

    /// Another live process holds this node's id: stops firing and every
    /// background loop, as `stop` does, but writes nothing (the record
    /// under the id is the other process's). The node is stopped after
    /// this (`is_running` is false; `start` it again once the id is free).
    async fn stand_down(&self) {
        let Some(running) = self.lifecycle.lock().await.take() else {
            return; // `stop` got there first
        };
        self.engine.stop();
        let _ = running.shutdown.send(true);
        if !self.engine.drain(self.drain_timeout).await {
            tracing::warn!(
                running = self.engine.running(),
                "drain timeout: leaving tasks running"
            );
        }
        // Every loop but this one (the caller, which returns right after).
        let me = tokio::task::try_id();
        for handle in running.loops {
            if Some(handle.id()) != me {
                handle.abort();
            }
        }
        self.engine.reset();
        let id = {
            let mut st = self.lock();
            st.me.status = NodeStatus::Starting;
            let id = st.me.id.clone();
            st.view.nodes.remove(&id);
            st.tombstones_known = false;
            id
        };
        tracing::warn!(node = %id, ns = %self.ns, "node stood down: another process holds its id");
    }

    /// After registering: starts the watch, loads the cluster state and
    /// turns `working`.
    async fn join(&self) -> Result<Option<WatchReceiver>> {
        let watch = match self.call("watch", self.registry.watch(&self.ns)).await {
            Ok(rx) => Some(rx),
            Err(err) => {
                tracing::warn!(%err, "watch unavailable at start; relying on reloads until it comes back");
                None
            }
        };
        self.reload_view().await?;
        let record = {
            let mut st = self.lock();
            st.me.status = NodeStatus::Working;
            st.record()
        };
        let updated = self.call("update node", self.registry.update_node(&self.ns, &record));
        if !updated.await? {
            self.call(
                "register",
                self.registry.register(&self.ns, &record, self.ttl),
            )
            .await?;
        }
        Ok(watch)
    }

    /// Re-registers after the registry lost this node.
    async fn reregister(&self) -> Result<()> {
        let record = {
            let mut st = self.lock();
            st.publish_statics = false;
            st.record()
        };
        self.call(
            "register",
            self.registry.register(&self.ns, &record, self.ttl),
        )
        .await?;
        self.apply(WatchEvent::NodePut(record));
        self.reload_view().await
    }
}

/// Sleeps `pause` unless shutdown is signalled first; returns whether to go on.
async fn pause_or_stop(pause: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(pause) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

fn backoff(failures: u32, base: Duration) -> Duration {
    base.saturating_mul(1 << failures.min(6)).min(MAX_BACKOFF)
}

async fn heartbeat_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut failures = 0u32;
    let mut reported = false;
    loop {
        let pause = if failures == 0 {
            inner.heartbeat
        } else {
            backoff(failures, inner.heartbeat / 2)
        };
        if !pause_or_stop(pause, &mut stop).await {
            return;
        }
        match inner.beat(&mut reported).await {
            Ok(Beat::Alive) => failures = 0,
            Ok(Beat::StandDown) => {
                inner.stand_down().await;
                return;
            }
            Err(err) => {
                failures += 1;
                tracing::warn!(%err, failures, "heartbeat failed; retrying with backoff");
            }
        }
    }
}

/// What a heartbeat found.
enum Beat {
    /// The registration is this node's (possibly just repaired).
    Alive,
    /// An older live process holds the node id: this one must yield.
    StandDown,
}

/// How many TTLs `start` waits for another registration of its node id to
/// expire (registries may take longer than one TTL: Consul up to two,
/// etcd rounds up to whole seconds, ZooKeeper uses its session timeout).
const STALE_WAIT_TTLS: u32 = 2;
/// A move of a record's `last_alive` by this much (ms) shows its node alive.
const LIFE_SIGN_MS: i64 = 200;

/// `now` (epoch ms), or later if needed to be above every create time
/// handed out before in this process, so no two starts of a node in one
/// process share one (it tells their records apart).
fn unique_create_time(now: i64) -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(i64::MIN);
    let prev = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(now.max(last.saturating_add(1)))
        })
        .unwrap_or(i64::MIN);
    now.max(prev.saturating_add(1))
}

async fn watch_loop(
    inner: Arc<Inner>,
    mut rx: Option<WatchReceiver>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let Some(feed) = rx.as_mut() else {
            if !pause_or_stop(backoff(failures, Duration::from_millis(200)), &mut stop).await {
                return;
            }
            match inner.call("watch", inner.registry.watch(&inner.ns)).await {
                Ok(new) => {
                    failures = 0;
                    rx = Some(new);
                    if let Err(err) = inner.reload_view().await {
                        tracing::warn!(%err, "reload after re-watch failed");
                    }
                }
                Err(err) => {
                    failures += 1;
                    tracing::warn!(%err, failures, "watch failed; retrying with backoff");
                }
            }
            continue;
        };
        let event = tokio::select! {
            ev = feed.recv() => ev,
            _ = stop.changed() => return,
        };
        match event {
            Some(WatchEvent::Resync) => {
                if let Err(err) = inner.reload_view().await {
                    tracing::warn!(%err, "reload after resync failed; the periodic reload will retry");
                }
            }
            Some(event) => inner.apply(event),
            None => {
                tracing::warn!("watch feed ended; re-watching");
                rx = None;
            }
        }
    }
}

async fn reload_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut failures = 0u32;
    loop {
        let pause = if failures == 0 {
            inner.reload
        } else {
            backoff(failures, Duration::from_millis(500))
        };
        if !pause_or_stop(pause, &mut stop).await {
            return;
        }
        match inner.reload_view().await {
            Ok(()) => failures = 0,
            Err(err) => {
                failures += 1;
                tracing::warn!(%err, failures, "reload failed; keeping the last known state");
            }
        }
    }
}

async fn reconcile_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = inner.dirty.notified() => {}
            _ = stop.changed() => return,
        }
        inner.reconcile().await;
    }
}

/// Waits for Ctrl-C (and SIGTERM on Unix): call it after `start` and then
/// `stop` the node for a graceful exit.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
