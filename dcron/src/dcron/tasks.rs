//! The task API: static tasks (defined in code on the nodes that add
//! them), dynamic tasks (stored in the registry, run by the task handler),
//! and deletion. The registry writes go through [`Admin`](crate::Admin);
//! this module adds what only a node knows (its static tasks, its view).

use std::future::Future;
use std::sync::Arc;

use super::{Dcron, Inner};
use crate::engine::Job;
use crate::error::{Error, Result};
use crate::registry::WatchEvent;
use crate::task::{validate_task_name, Task, TaskContext, TaskMeta, TaskResult};

impl Dcron {
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

    /// Adds a dynamic task: stored in the registry, seen by every node, run
    /// by the task handler of its owner. Nothing is written if the name,
    /// cron or payload is invalid.
    pub async fn add_task_meta(&self, meta: TaskMeta) -> Result<()> {
        let inner = &self.inner;
        inner.admin.check_task(&meta)?;
        inner.check_not_deleted(&meta.name).await?;
        if inner.lock().statics.contains_key(&meta.name) {
            return Err(Error::TaskExists(meta.name));
        }
        inner.admin.store(&meta, false).await
    }

    /// Overwrites: clears the tombstone and the claim of the name, then
    /// stores the definition (replacing any old one).
    pub async fn force_add_task_meta(&self, meta: TaskMeta) -> Result<()> {
        self.inner.admin.check_task(&meta)?;
        self.inner.forget_history(&meta.name).await?;
        self.inner.admin.store(&meta, true).await
    }

    /// Writes a tombstone: the task stops on every node, and a plain
    /// `add_*` of the name fails with [`Error::TaskDeleted`], also after
    /// restarts, until [`reuse_deleted_task`](Self::reuse_deleted_task).
    pub async fn mark_task_deleted(&self, name: &str) -> Result<()> {
        self.inner.admin.mark_deleted(name).await?;
        self.inner.apply(WatchEvent::TombstonePut(name.to_string()));
        Ok(())
    }

    /// Removes the tombstone so the task runs again.
    pub async fn reuse_deleted_task(&self, name: &str) -> Result<()> {
        self.inner.admin.reuse_deleted(name).await?;
        self.inner
            .apply(WatchEvent::TombstoneDelete(name.to_string()));
        Ok(())
    }

    /// Removes every trace of the task: dynamic definition, tombstone,
    /// claim, and this node's static definition.
    pub async fn cleanup_task(&self, name: &str) -> Result<()> {
        self.inner.admin.cleanup(name).await?;
        let mut st = self.inner.lock();
        if st.statics.remove(name).is_some() {
            st.publish_statics = true;
        }
        drop(st);
        self.inner.apply(WatchEvent::TaskDelete(name.to_string()));
        self.inner
            .apply(WatchEvent::TombstoneDelete(name.to_string()));
        Ok(())
    }

    /// Wipes the namespace's dynamic tasks, tombstones and claims (for
    /// tests and resets). Static definitions in code stay.
    pub async fn force_cleanup_all_tasks(&self) -> Result<()> {
        self.inner.admin.clear().await?;
        let mut st = self.inner.lock();
        st.view.tasks.clear();
        st.view.tombstones.clear();
        drop(st);
        self.inner.dirty.notify_one();
        Ok(())
    }
}

impl Inner {
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

    /// Clears the tombstone and the claim of `name` (forced adds).
    async fn forget_history(&self, name: &str) -> Result<()> {
        self.admin.forget_history(name).await?;
        self.apply(WatchEvent::TombstoneDelete(name.to_string()));
        Ok(())
    }
}
