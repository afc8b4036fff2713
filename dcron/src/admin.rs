//! Task operations that need no running node: the writes behind the task
//! API of [`Dcron`](crate::Dcron), and what tools use to change or read a
//! namespace from outside the cluster.

use std::sync::Arc;

use chrono_tz::Tz;

use crate::error::{Error, Result};
use crate::node::Node;
use crate::registry::{Claim, Registry};
use crate::schedule::Schedule;
use crate::task::{validate_task_name, TaskMeta, DEFAULT_MAX_PAYLOAD};

/// Changes and reads the tasks of one namespace, straight in the registry,
/// with the checks a node applies: no node needs to run.
///
/// Nodes see the changes through their watch, as if another node made
/// them. Every operation validates its input first: a bad name, cron
/// expression or payload is a typed error ([`Error::InvalidTaskName`],
/// [`Error::InvalidCron`], [`Error::PayloadTooLarge`]) and writes nothing.
///
/// Cheap to clone.
///
/// ```
/// use std::sync::Arc;
/// use dcron::{Admin, Error, MemoryRegistry, TaskMeta};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dcron::Result<()> {
/// let admin = Admin::new(Arc::new(MemoryRegistry::new()), "billing")?;
/// admin.add_task(&TaskMeta::new("sync", "*/5 * * * * *").with_payload("tenant-42")).await?;
/// assert!(matches!(
///     admin.add_task(&TaskMeta::new("sync", "* * * * * *")).await,
///     Err(Error::TaskExists(_))
/// ));
/// admin.mark_deleted("sync").await?; // stops it on every node
/// assert!(admin.is_deleted("sync").await?);
/// admin.reuse_deleted("sync").await?; // runs again
/// admin.cleanup("sync").await?; // every trace gone
/// assert!(admin.tasks().await?.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Admin {
    registry: Arc<dyn Registry>,
    ns: String,
    max_payload: usize,
    timezone: Tz,
}

/// Everything the registry holds for a namespace, each list sorted by name.
#[derive(Debug, Clone, Default)]
pub struct NamespaceSnapshot {
    /// Live nodes.
    pub nodes: Vec<Node>,
    /// Dynamic task definitions.
    pub tasks: Vec<TaskMeta>,
    /// Names marked deleted.
    pub tombstones: Vec<String>,
    /// The last claimed fire of every task that ran.
    pub claims: Vec<(String, Claim)>,
}

impl Admin {
    /// Works on `namespace` of `registry`; fails with
    /// [`Error::InvalidConfig`] if the namespace is not a valid name (the
    /// alphabet of task names). Payloads up to the default limit
    /// ([`DEFAULT_MAX_PAYLOAD`]) are accepted; cron expressions without a
    /// `CRON_TZ=` prefix are read in UTC.
    pub fn new(registry: Arc<dyn Registry>, namespace: impl Into<String>) -> Result<Admin> {
        let ns = namespace.into();
        validate_task_name(&ns).map_err(|e| Error::InvalidConfig(format!("namespace: {e}")))?;
        Ok(Admin::unchecked(registry, ns))
    }

    /// For a namespace validated already (a node's).
    pub(crate) fn unchecked(registry: Arc<dyn Registry>, ns: String) -> Admin {
        Admin {
            registry,
            ns,
            max_payload: DEFAULT_MAX_PAYLOAD,
            timezone: Tz::UTC,
        }
    }

    /// Largest accepted payload in bytes (as [`Builder::max_payload`](crate::Builder::max_payload)).
    pub fn with_max_payload(mut self, bytes: usize) -> Admin {
        self.max_payload = bytes;
        self
    }

    /// Time zone cron expressions are checked in (as [`Builder::timezone`](crate::Builder::timezone)).
    pub fn with_timezone(mut self, tz: Tz) -> Admin {
        self.timezone = tz;
        self
    }

    /// The namespace worked on.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The registry worked on.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    // ----- checks -------------------------------------------------------

    /// Checks a dynamic task's name, cron expression and payload size.
    pub fn check_task(&self, meta: &TaskMeta) -> Result<()> {
        validate_task_name(&meta.name)?;
        if meta.payload.len() > self.max_payload {
            return Err(Error::PayloadTooLarge {
                size: meta.payload.len(),
                limit: self.max_payload,
            });
        }
        Schedule::parse(&meta.cron_format, self.timezone).map(drop)
    }

    /// Whether `name` carries a tombstone.
    pub async fn is_deleted(&self, name: &str) -> Result<bool> {
        validate_task_name(name)?;
        Ok(self.tombstones().await?.iter().any(|t| t == name))
    }

    // ----- writes -------------------------------------------------------

    /// Stores a new dynamic task. Fails with [`Error::TaskDeleted`] if the
    /// name carries a tombstone and [`Error::TaskExists`] if a dynamic
    /// task of that name is stored.
    pub async fn add_task(&self, meta: &TaskMeta) -> Result<()> {
        self.check_task(meta)?;
        if self.is_deleted(&meta.name).await? {
            return Err(Error::TaskDeleted(meta.name.clone()));
        }
        self.store(meta, false).await
    }

    /// Overwrites: clears the tombstone and the claim of the name, then
    /// stores the definition (replacing any old one).
    pub async fn force_add_task(&self, meta: &TaskMeta) -> Result<()> {
        self.check_task(meta)?;
        self.forget_history(&meta.name).await?;
        self.store(meta, true).await
    }

    /// Writes a tombstone: the task stops on every node, and a plain add
    /// of the name fails with [`Error::TaskDeleted`] until
    /// [`reuse_deleted`](Self::reuse_deleted).
    pub async fn mark_deleted(&self, name: &str) -> Result<()> {
        validate_task_name(name)?;
        self.registry.put_tombstone(&self.ns, name).await
    }

    /// Removes the tombstone so the task runs again.
    pub async fn reuse_deleted(&self, name: &str) -> Result<()> {
        validate_task_name(name)?;
        self.registry.delete_tombstone(&self.ns, name).await
    }

    /// Removes every trace of the task in the registry: dynamic
    /// definition, tombstone, claim. (Nodes that define it statically keep
    /// their definition.)
    pub async fn cleanup(&self, name: &str) -> Result<()> {
        validate_task_name(name)?;
        self.forget(name, Forget::Everything).await
    }

    /// Wipes the namespace's dynamic tasks, tombstones and claims (for
    /// tests and resets).
    pub async fn clear(&self) -> Result<()> {
        self.registry.clear(&self.ns).await
    }

    /// Clears the tombstone and the claim of `name` (forced adds), after
    /// checking the name.
    pub(crate) async fn forget_history(&self, name: &str) -> Result<()> {
        validate_task_name(name)?;
        self.forget(name, Forget::History).await
    }

    /// The one path that removes a task's traces: the claim always, the
    /// rest as `what` says.
    pub(crate) async fn forget(&self, name: &str, what: Forget) -> Result<()> {
        let (reg, ns) = (&self.registry, self.ns.as_str());
        if what != Forget::History {
            reg.delete_task(ns, name).await?;
        }
        if what != Forget::KeepTombstone {
            reg.delete_tombstone(ns, name).await?;
        }
        reg.delete_claim(ns, name).await
    }

    /// Stores a definition checked already.
    pub(crate) async fn store(&self, meta: &TaskMeta, overwrite: bool) -> Result<()> {
        self.registry.put_task(&self.ns, meta, overwrite).await
    }

    // ----- reads --------------------------------------------------------

    /// Live nodes, sorted by id.
    pub async fn nodes(&self) -> Result<Vec<Node>> {
        let mut nodes = self.registry.nodes(&self.ns).await?;
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    /// Dynamic task definitions, sorted by name.
    pub async fn tasks(&self) -> Result<Vec<TaskMeta>> {
        let mut tasks = self.registry.tasks(&self.ns).await?;
        tasks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tasks)
    }

    /// Names marked deleted, sorted.
    pub async fn tombstones(&self) -> Result<Vec<String>> {
        let mut names = self.registry.tombstones(&self.ns).await?;
        names.sort();
        Ok(names)
    }

    /// The last claimed fire of every task that ran, sorted by task name.
    pub async fn claims(&self) -> Result<Vec<(String, Claim)>> {
        let mut claims = self.registry.claims(&self.ns).await?;
        claims.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(claims)
    }

    /// Nodes, tasks, tombstones and claims, read concurrently.
    pub async fn snapshot(&self) -> Result<NamespaceSnapshot> {
        let (nodes, tasks, tombstones, claims) =
            tokio::try_join!(self.nodes(), self.tasks(), self.tombstones(), self.claims())?;
        Ok(NamespaceSnapshot {
            nodes,
            tasks,
            tombstones,
            claims,
        })
    }
}

/// Which traces of a task [`Admin::forget`] removes besides its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forget {
    /// The tombstone (a forced add starts the name afresh).
    History,
    /// The definition; the tombstone stays (a one-shot task cleaned up
    /// after its run must never run again).
    KeepTombstone,
    /// Definition and tombstone.
    Everything,
}
