//! Which tasks this node owns: recomputed from the view on every change,
//! handed to the engine, with the node's static task list published when
//! it changed.

use super::Inner;
use crate::engine::Job;
use crate::node::Node;
use crate::view;

impl Inner {
    /// Recomputes which tasks this node owns and hands them to the engine;
    /// catches up missed fires of tasks it just took over.
    pub(super) async fn reconcile(&self) {
        let (jobs, publish) = self.owned_jobs();
        if let Some(record) = publish {
            self.publish_statics(record).await;
        }
        let added = self.engine.set_jobs(jobs);
        self.catch_up(added).await;
    }

    /// The jobs of the tasks the strategy gives this node, and this node's
    /// record if its static task list is to be published.
    fn owned_jobs(&self) -> (Vec<Job>, Option<Node>) {
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
                match super::schedule_in(&mut st.schedules, &meta.cron_format, self.timezone) {
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
    }

    /// Publishes this node's record with its static task list; on failure
    /// the next reconcile tries again.
    async fn publish_statics(&self, record: Node) {
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
}
