//! `dcron nodes` and `dcron tasks`: the cluster as its nodes see it.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;

use chrono_tz::Tz;
use dcron::registry::Claim;
use dcron::schedule::Schedule;
use dcron::{Admin, Node, NodeStatus, Registry, Strategy, TaskMeta};
use serde_json::{json, Value};

use crate::error::{CliError, CliResult};
use crate::output::{self, Format};

/// Everything the registry holds for a namespace.
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub tasks: Vec<TaskMeta>,
    pub tombstones: Vec<String>,
    pub claims: Vec<(String, Claim)>,
}

impl Snapshot {
    /// Reads nodes, tasks, tombstones and claims (concurrently), sorted.
    pub async fn load(registry: &Arc<dyn Registry>, ns: &str) -> CliResult<Snapshot> {
        let snap = Admin::new(registry.clone(), ns)?.snapshot().await?;
        Ok(Snapshot {
            nodes: snap.nodes,
            tasks: snap.tasks,
            tombstones: snap.tombstones,
            claims: snap.claims,
        })
    }
}

/// The strategy the cluster's nodes use, as far as it can be known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterStrategy {
    /// Every node publishes this built-in strategy (or `--strategy` said so).
    Known(Strategy),
    /// Owners cannot be computed from outside; the reason says why.
    Unknown(String),
}

impl ClusterStrategy {
    /// Name for output: the strategy's, or `unknown`.
    pub fn name(&self) -> String {
        match self {
            ClusterStrategy::Known(s) => s.to_string(),
            ClusterStrategy::Unknown(_) => "unknown".into(),
        }
    }
}

/// Parses a strategy name (`consistent`, `hash-sharding`, ...).
pub fn parse_strategy(name: &str) -> CliResult<Strategy> {
    Strategy::from_str(name.trim()).map_err(|e| CliError::invalid(e.to_string()))
}

/// Works out the cluster's strategy from what its nodes publish.
pub fn cluster_strategy(nodes: &[Node], forced: Option<&str>) -> CliResult<ClusterStrategy> {
    if let Some(name) = forced {
        return parse_strategy(name).map(ClusterStrategy::Known);
    }
    // Working nodes decide ownership; fall back to all nodes for the name.
    let working: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Working)
        .collect();
    let considered: Vec<&Node> = if working.is_empty() {
        nodes.iter().collect()
    } else {
        working
    };
    let names: BTreeSet<Option<&str>> = considered.iter().map(|n| n.strategy.as_deref()).collect();
    let mut names = names.into_iter();
    let only = match (names.next(), names.next()) {
        (None, _) => return Ok(ClusterStrategy::Known(Strategy::default())),
        (Some(one), None) => one,
        (Some(_), Some(_)) => {
            return Ok(ClusterStrategy::Unknown(
                "the nodes publish different strategies".into(),
            ))
        }
    };
    Ok(match only {
        None => ClusterStrategy::Unknown(
            "the nodes do not publish their strategy; pass --strategy".into(),
        ),
        Some("custom") => ClusterStrategy::Unknown("the nodes use a custom assigner".into()),
        Some(name) => match Strategy::from_str(name) {
            Ok(s) => ClusterStrategy::Known(s),
            Err(_) => ClusterStrategy::Unknown(format!(
                "the nodes use strategy `{name}`, which this dcron does not know"
            )),
        },
    })
}

/// Task name → owner node id, or `None` when owners cannot be computed.
pub fn owners(snap: &Snapshot, strategy: &ClusterStrategy) -> Option<BTreeMap<String, String>> {
    match strategy {
        ClusterStrategy::Known(s) => Some(dcron::ownership(
            &snap.nodes,
            &snap.tasks,
            &snap.tombstones,
            s,
        )),
        ClusterStrategy::Unknown(_) => None,
    }
}

fn warn_unknown(strategy: &ClusterStrategy) {
    if let ClusterStrategy::Unknown(why) = strategy {
        eprintln!("note: task owners are unknown: {why}");
    }
}

/// `dcron nodes`.
pub fn nodes(snap: &Snapshot, strategy: &ClusterStrategy, format: Format) -> CliResult<()> {
    let owners = owners(snap, strategy);
    let mut owned: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    if let Some(owners) = &owners {
        for (task, node) in owners {
            owned.entry(node.as_str()).or_default().push(task.as_str());
        }
    }
    let now = output::now_ms();
    match format {
        Format::Json => {
            let list: Vec<Value> = snap
                .nodes
                .iter()
                .map(|n| {
                    let tasks = owners
                        .as_ref()
                        .map(|_| owned.get(n.id.as_str()).cloned().unwrap_or_default());
                    json!({
                        "id": n.id,
                        "ip": n.ip,
                        "hostname": n.hostname,
                        "status": n.status.as_str(),
                        "weight": n.weight,
                        "strategy": n.strategy,
                        "last_alive": n.last_alive,
                        "last_alive_rfc3339": output::rfc3339(n.last_alive),
                        "create_time": n.create_time,
                        "create_time_rfc3339": output::rfc3339(n.create_time),
                        "static_tasks": n.static_tasks,
                        "tasks_owned": tasks.as_ref().map(Vec::len),
                        "owned_tasks": tasks,
                    })
                })
                .collect();
            output::print_json(&Value::Array(list))
        }
        Format::Table => {
            warn_unknown(strategy);
            if snap.nodes.is_empty() {
                eprintln!("no live nodes in this namespace");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = snap
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.id.clone(),
                        n.ip.clone(),
                        n.hostname.clone(),
                        n.status.to_string(),
                        n.weight.to_string(),
                        n.strategy.clone().unwrap_or_else(|| "-".into()),
                        // Only live nodes are listed; when this one joined is
                        // what tells a restart apart.
                        output::human_time(n.create_time, now),
                        match &owners {
                            Some(_) => owned.get(n.id.as_str()).map_or(0, Vec::len).to_string(),
                            None => "?".into(),
                        },
                    ]
                })
                .collect();
            output::print(&output::table(
                &[
                    "ID",
                    "IP",
                    "HOSTNAME",
                    "STATUS",
                    "WEIGHT",
                    "STRATEGY",
                    "REGISTERED",
                    "TASKS",
                ],
                &rows,
            ))
        }
    }
}

/// One row of `dcron tasks`.
struct TaskRow<'a> {
    name: &'a str,
    /// The dynamic definition, if any.
    meta: Option<&'a TaskMeta>,
    /// Live nodes defining it as a static task.
    definers: Vec<&'a str>,
    deleted: bool,
    claim: Option<&'a Claim>,
}

impl TaskRow<'_> {
    fn kind(&self) -> &'static str {
        if !self.definers.is_empty() {
            "static"
        } else if self.meta.is_some() {
            "dynamic"
        } else {
            "unknown"
        }
    }

    /// The cron expression, known for dynamic tasks only (nodes do not
    /// publish the schedules of their static tasks).
    fn cron(&self) -> Option<&str> {
        if self.definers.is_empty() {
            self.meta.map(|m| m.cron_format.as_str())
        } else {
            None
        }
    }
}

/// `dcron tasks`.
pub fn tasks(
    snap: &Snapshot,
    strategy: &ClusterStrategy,
    timezone: Tz,
    format: Format,
) -> CliResult<()> {
    let owners = owners(snap, strategy);
    let tombstones: BTreeSet<&str> = snap.tombstones.iter().map(String::as_str).collect();
    let claims: BTreeMap<&str, &Claim> = snap.claims.iter().map(|(n, c)| (n.as_str(), c)).collect();
    let metas: BTreeMap<&str, &TaskMeta> =
        snap.tasks.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut definers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for node in &snap.nodes {
        for name in &node.static_tasks {
            definers
                .entry(name.as_str())
                .or_default()
                .push(node.id.as_str());
        }
    }
    let names: BTreeSet<&str> = metas
        .keys()
        .chain(definers.keys())
        .chain(tombstones.iter())
        .chain(claims.keys())
        .copied()
        .collect();
    let rows: Vec<TaskRow> = names
        .into_iter()
        .map(|name| TaskRow {
            name,
            meta: metas.get(name).copied(),
            definers: definers.get(name).cloned().unwrap_or_default(),
            deleted: tombstones.contains(name),
            claim: claims.get(name).copied(),
        })
        .collect();
    let now = output::now_ms();
    // A definition whose cron does not parse (written by another program)
    // never runs: it has no owner, whatever the strategy says.
    let unrunnable = |row: &TaskRow| -> Option<String> {
        let cron = row.meta?.cron_format.as_str();
        Schedule::parse(cron, timezone).err().map(|e| e.to_string())
    };
    let owners = owners.map(|mut o| {
        for row in &rows {
            if unrunnable(row).is_some() {
                o.remove(row.name);
            }
        }
        o
    });
    let next_fire = |row: &TaskRow| -> Option<i64> {
        if row.deleted {
            return None;
        }
        Schedule::parse(row.cron()?, timezone).ok()?.next_after(now)
    };
    match format {
        Format::Json => {
            let list: Vec<Value> = rows
                .iter()
                .map(|row| {
                    let owner = owners.as_ref().map(|o| o.get(row.name).cloned());
                    let next = next_fire(row);
                    json!({
                        "name": row.name,
                        "kind": row.kind(),
                        "cron": row.cron(),
                        "one_shot": row.meta.is_some_and(|m| m.one_shot),
                        "executed_and_mark_deleted": row.meta.is_some_and(|m| m.executed_and_mark_deleted),
                        "executed_and_cleanup": row.meta.is_some_and(|m| m.executed_and_cleanup),
                        "payload": row.meta.map(|m| m.payload.as_str()),
                        "deleted": row.deleted,
                        "defined_by": row.definers,
                        // null: nobody owns it; absent strategy: owner_known false.
                        "owner": owner.clone().flatten(),
                        "owner_known": owner.is_some(),
                        "invalid": unrunnable(row),
                        "next_fire": next,
                        "next_fire_rfc3339": next.and_then(output::rfc3339),
                        "last_run": row.claim.map(|c| json!({
                            "fire_time": c.fire_time,
                            "fire_time_rfc3339": output::rfc3339(c.fire_time),
                            "node": c.node,
                            "claimed_at": c.claimed_at,
                            "claimed_at_rfc3339": output::rfc3339(c.claimed_at),
                        })),
                    })
                })
                .collect();
            output::print_json(&json!({
                "strategy": strategy.name(),
                "tasks": list,
            }))
        }
        Format::Table => {
            warn_unknown(strategy);
            if rows.is_empty() {
                eprintln!("no tasks in this namespace");
                return Ok(());
            }
            let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
            let table_rows: Vec<Vec<String>> = rows
                .iter()
                .map(|row| {
                    let owner = match &owners {
                        _ if unrunnable(row).is_some() => "invalid cron".to_string(),
                        None => "unknown".to_string(),
                        Some(o) => o.get(row.name).cloned().unwrap_or_else(|| "-".into()),
                    };
                    vec![
                        row.name.to_string(),
                        row.kind().to_string(),
                        row.cron().unwrap_or("-").to_string(),
                        yes_no(row.meta.is_some_and(|m| m.one_shot)),
                        yes_no(row.deleted),
                        owner,
                        next_fire(row).map_or_else(|| "-".into(), |t| output::human_time(t, now)),
                        row.claim
                            .map_or_else(|| "-".into(), |c| output::human_time(c.fire_time, now)),
                        row.claim.map_or_else(|| "-".into(), |c| c.node.clone()),
                    ]
                })
                .collect();
            output::print(&output::table(
                &[
                    "NAME",
                    "KIND",
                    "CRON",
                    "ONE-SHOT",
                    "DELETED",
                    "OWNER",
                    "NEXT FIRE",
                    "LAST RUN",
                    "LAST NODE",
                ],
                &table_rows,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, strategy: Option<&str>) -> Node {
        Node {
            id: id.into(),
            ip: String::new(),
            hostname: String::new(),
            last_alive: 0,
            create_time: 0,
            status: NodeStatus::Working,
            weight: 1,
            strategy: strategy.map(str::to_string),
            dynamic_tasks: true,
            static_tasks: Vec::new(),
        }
    }

    #[test]
    fn strategy_from_nodes() {
        let known = |s| ClusterStrategy::Known(s);
        assert_eq!(
            cluster_strategy(&[node("a", Some("range")), node("b", Some("range"))], None).unwrap(),
            known(Strategy::Range)
        );
        assert!(matches!(
            cluster_strategy(
                &[node("a", Some("range")), node("b", Some("weighted"))],
                None
            )
            .unwrap(),
            ClusterStrategy::Unknown(_)
        ));
        assert!(matches!(
            cluster_strategy(&[node("a", Some("custom"))], None).unwrap(),
            ClusterStrategy::Unknown(_)
        ));
        assert!(matches!(
            cluster_strategy(&[node("a", None)], None).unwrap(),
            ClusterStrategy::Unknown(_)
        ));
        assert_eq!(
            cluster_strategy(&[node("a", None)], Some("round-robin")).unwrap(),
            known(Strategy::RoundRobin)
        );
        assert!(cluster_strategy(&[], Some("nope")).is_err());
    }
}
