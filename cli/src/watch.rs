//! `dcron watch`: node and task changes, live.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use dcron::registry::{WatchEvent, WatchReceiver};
use dcron::{Node, Registry, TaskMeta};
use serde_json::{json, Value};

use crate::error::{CliError, CliResult};
use crate::output::{self, Format};

/// What the watcher knows, to tell joins from updates and to diff after a
/// resync.
#[derive(Default)]
struct Known {
    nodes: BTreeMap<String, Node>,
    tasks: BTreeMap<String, TaskMeta>,
    tombstones: BTreeSet<String>,
}

/// One line of output.
enum Line {
    NodeJoin(Node),
    NodeUpdate(Node),
    NodeLeave(String),
    TaskPut(TaskMeta),
    TaskDelete(String),
    TombstonePut(String),
    TombstoneDelete(String),
    Resync,
}

impl Line {
    fn json(&self, time: &str) -> Value {
        match self {
            Line::NodeJoin(n) | Line::NodeUpdate(n) => json!({
                "time": time,
                "event": if matches!(self, Line::NodeJoin(_)) { "node_join" } else { "node_update" },
                "node": {
                    "id": n.id, "ip": n.ip, "hostname": n.hostname, "status": n.status.as_str(),
                    "weight": n.weight, "strategy": n.strategy, "static_tasks": n.static_tasks,
                },
            }),
            Line::NodeLeave(id) => json!({"time": time, "event": "node_leave", "node": {"id": id}}),
            Line::TaskPut(t) => json!({"time": time, "event": "task_put", "task": t}),
            Line::TaskDelete(name) => {
                json!({"time": time, "event": "task_removed", "task": {"name": name}})
            }
            Line::TombstonePut(name) => {
                json!({"time": time, "event": "task_marked_deleted", "task": {"name": name}})
            }
            Line::TombstoneDelete(name) => {
                json!({"time": time, "event": "task_revived", "task": {"name": name}})
            }
            Line::Resync => json!({"time": time, "event": "resync"}),
        }
    }

    fn text(&self, time: &str) -> String {
        let (what, detail) = match self {
            Line::NodeJoin(n) => ("node-join", node_detail(n)),
            Line::NodeUpdate(n) => ("node-update", node_detail(n)),
            Line::NodeLeave(id) => ("node-leave", id.clone()),
            Line::TaskPut(t) => {
                let mut flags = Vec::new();
                if t.one_shot {
                    flags.push("one-shot");
                }
                if t.executed_and_mark_deleted {
                    flags.push("delete-after-run");
                }
                if t.executed_and_cleanup {
                    flags.push("cleanup-after-run");
                }
                let flags = if flags.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", flags.join(", "))
                };
                (
                    "task-put",
                    format!(
                        "{} `{}`{flags} payload {} bytes",
                        t.name,
                        t.cron_format,
                        t.payload.len()
                    ),
                )
            }
            Line::TaskDelete(name) => ("task-removed", name.clone()),
            Line::TombstonePut(name) => ("task-marked-deleted", name.clone()),
            Line::TombstoneDelete(name) => ("task-revived", name.clone()),
            Line::Resync => (
                "resync",
                "events may have been lost; state reloaded".to_string(),
            ),
        };
        format!("{time}  {what:<19}  {detail}\n")
    }
}

fn node_detail(n: &Node) -> String {
    format!(
        "{} status={} ip={} host={} weight={} static_tasks={}",
        n.id,
        n.status,
        n.ip,
        n.hostname,
        n.weight,
        n.static_tasks.len()
    )
}

impl Known {
    /// Applies an event; returns the line to print, if anything changed.
    fn apply(&mut self, event: WatchEvent) -> Option<Line> {
        match event {
            WatchEvent::NodePut(node) => match self.nodes.insert(node.id.clone(), node.clone()) {
                None => Some(Line::NodeJoin(node)),
                Some(old)
                    if old.status != node.status
                        || old.static_tasks != node.static_tasks
                        || old.weight != node.weight
                        || old.ip != node.ip
                        || old.strategy != node.strategy =>
                {
                    Some(Line::NodeUpdate(node))
                }
                Some(_) => None,
            },
            WatchEvent::NodeDelete(id) => self.nodes.remove(&id).map(|_| Line::NodeLeave(id)),
            WatchEvent::TaskPut(meta) => {
                let changed = self.tasks.get(&meta.name) != Some(&meta);
                self.tasks.insert(meta.name.clone(), meta.clone());
                changed.then_some(Line::TaskPut(meta))
            }
            WatchEvent::TaskDelete(name) => {
                self.tasks.remove(&name).map(|_| Line::TaskDelete(name))
            }
            WatchEvent::TombstonePut(name) => self
                .tombstones
                .insert(name.clone())
                .then_some(Line::TombstonePut(name)),
            WatchEvent::TombstoneDelete(name) => self
                .tombstones
                .remove(&name)
                .then_some(Line::TombstoneDelete(name)),
            WatchEvent::Resync => None,
        }
    }

    /// Reads everything and returns the differences as events.
    async fn reload(
        &mut self,
        registry: &Arc<dyn Registry>,
        ns: &str,
    ) -> dcron::Result<Vec<WatchEvent>> {
        let (nodes, tasks, tombstones) = tokio::try_join!(
            registry.nodes(ns),
            registry.tasks(ns),
            registry.tombstones(ns)
        )?;
        let mut events = Vec::new();
        let node_ids: BTreeSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        let task_names: BTreeSet<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
        let stones: BTreeSet<&str> = tombstones.iter().map(String::as_str).collect();
        for id in self
            .nodes
            .keys()
            .filter(|id| !node_ids.contains(id.as_str()))
        {
            events.push(WatchEvent::NodeDelete(id.clone()));
        }
        for name in self
            .tasks
            .keys()
            .filter(|n| !task_names.contains(n.as_str()))
        {
            events.push(WatchEvent::TaskDelete(name.clone()));
        }
        for name in self
            .tombstones
            .iter()
            .filter(|n| !stones.contains(n.as_str()))
        {
            events.push(WatchEvent::TombstoneDelete(name.clone()));
        }
        events.extend(nodes.into_iter().map(WatchEvent::NodePut));
        events.extend(tasks.into_iter().map(WatchEvent::TaskPut));
        events.extend(tombstones.into_iter().map(WatchEvent::TombstonePut));
        Ok(events)
    }
}

fn emit(line: &Line, format: Format) -> CliResult<()> {
    let time = output::rfc3339(output::now_ms()).unwrap_or_default();
    match format {
        Format::Json => output::print_json_line(&line.json(&time)),
        Format::Table => output::print(&line.text(&time)),
    }
}

/// Streams events until Ctrl-C / SIGTERM. With `snapshot`, the current
/// nodes and tasks are printed first as join / put events.
pub async fn run(
    registry: Arc<dyn Registry>,
    ns: &str,
    format: Format,
    snapshot: bool,
) -> CliResult<()> {
    let mut known = Known::default();
    // Subscribe first, then read, so nothing falls between the two.
    let mut feed: Option<WatchReceiver> = Some(
        registry
            .watch(ns)
            .await
            .map_err(|e| CliError::from(e).context("cannot watch the registry"))?,
    );
    let initial = known.reload(&registry, ns).await?;
    for event in initial {
        let line = known.apply(event);
        if let (true, Some(line)) = (snapshot, line) {
            emit(&line, format)?;
        }
    }
    if format == Format::Table {
        eprintln!("watching namespace `{ns}` (Ctrl-C to stop)");
    }
    let stop = crate::signals::shutdown();
    tokio::pin!(stop);
    let mut failures = 0u32;
    loop {
        let Some(rx) = feed.as_mut() else {
            let pause = Duration::from_millis(200u64 << failures.min(5));
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
            match registry.watch(ns).await {
                Ok(rx) => {
                    failures = 0;
                    feed = Some(rx);
                    resync(&mut known, &registry, ns, format).await?;
                }
                Err(err) => {
                    failures += 1;
                    eprintln!(
                        "watch failed ({}); retrying",
                        crate::error::error_chain(&err)
                    );
                }
            }
            continue;
        };
        let event = tokio::select! {
            _ = &mut stop => return Ok(()),
            ev = rx.recv() => ev,
        };
        match event {
            Some(WatchEvent::Resync) => resync(&mut known, &registry, ns, format).await?,
            Some(event) => {
                if let Some(line) = known.apply(event) {
                    emit(&line, format)?;
                }
            }
            None => {
                eprintln!("the watch feed ended; reconnecting");
                feed = None;
            }
        }
    }
}

async fn resync(
    known: &mut Known,
    registry: &Arc<dyn Registry>,
    ns: &str,
    format: Format,
) -> CliResult<()> {
    emit(&Line::Resync, format)?;
    match known.reload(registry, ns).await {
        Ok(events) => {
            for event in events {
                if let Some(line) = known.apply(event) {
                    emit(&line, format)?;
                }
            }
        }
        Err(err) => eprintln!(
            "reload after resync failed ({}); continuing",
            crate::error::error_chain(&err)
        ),
    }
    Ok(())
}
