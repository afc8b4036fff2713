//! The agent's configuration file (TOML).
//!
//! ```toml
//! registry = "redis://127.0.0.1:6379"   # --registry / DCRON_REGISTRY win
//! namespace = "billing"                  # --namespace / DCRON_NAMESPACE win
//! strategy = "consistent"
//! weight = 1
//! node_ttl = "10s"
//!
//! [handler]                              # runs every dynamic task
//! command = ["/usr/local/bin/run-job"]
//! timeout = "5m"
//!
//! [[task]]                               # static tasks
//! name = "nightly-report"
//! cron = "0 3 * * *"
//! command = "pg_dump billing > /backups/billing.sql"
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono_tz::Tz;
use dcron::schedule::Schedule;
use dcron::task::validate_task_name;
use dcron::{CatchUp, Overlap, Strategy};
use serde::{Deserialize, Deserializer};

use crate::error::{CliError, CliResult};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Registry URL (secrets belong in environment variables).
    pub registry: Option<String>,
    /// Namespace (default `dcron`).
    pub namespace: Option<String>,
    /// Node id (default: a random UUID at every start).
    pub node_id: Option<String>,
    /// Address published with the node (default: the host's outbound one).
    pub ip: Option<String>,
    /// Weight for the `weighted` strategy (default 1).
    pub weight: Option<u32>,
    /// Assignment strategy (default `consistent`).
    pub strategy: Option<String>,
    /// Zone of cron expressions without `CRON_TZ=` (default `UTC`).
    pub timezone: Option<String>,
    /// How long the node stays registered without heartbeats.
    #[serde(default, deserialize_with = "opt_duration")]
    pub node_ttl: Option<Duration>,
    /// How often liveness is extended.
    #[serde(default, deserialize_with = "opt_duration")]
    pub heartbeat: Option<Duration>,
    /// How often the whole state is reloaded.
    #[serde(default, deserialize_with = "opt_duration")]
    pub reload_interval: Option<Duration>,
    /// How long a graceful stop waits for running tasks (default 30 s).
    #[serde(default, deserialize_with = "opt_duration")]
    pub drain_timeout: Option<Duration>,
    /// Missed-fire window (`"1m"`), or `"off"`.
    pub catch_up: Option<String>,
    /// `skip` (default) or `allow`.
    pub overlap: Option<String>,
    /// Default timeout of every command (default: none).
    #[serde(default, deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Environment for every command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The command run for every dynamic task.
    pub handler: Option<HandlerConfig>,
    /// Static tasks.
    #[serde(default, rename = "task")]
    pub tasks: Vec<TaskConfig>,
}

/// `[handler]`: runs dynamic tasks. An argv list, never a shell string,
/// so a payload can never become shell code.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// Program and arguments.
    #[serde(deserialize_with = "argv_only")]
    pub command: Vec<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    pub working_dir: Option<PathBuf>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// `[[task]]`: a static task.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    pub cron: String,
    /// A string runs with `/bin/sh -c`; a list runs as argv.
    pub command: CommandLine,
    #[serde(default, deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    pub working_dir: Option<PathBuf>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run once in the whole cluster, ever.
    #[serde(default)]
    pub one_shot: bool,
}

/// A command line: shell text or argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    Shell(String),
    Argv(Vec<String>),
}

impl<'de> Deserialize<'de> for CommandLine {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = CommandLine;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a shell command (\"echo hi\") or a list of program and arguments ([\"echo\", \"hi\"])",
                )
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CommandLine, E> {
                Ok(CommandLine::Shell(v.to_string()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CommandLine, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<String>()? {
                    argv.push(arg);
                }
                Ok(CommandLine::Argv(argv))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// How a command is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub line: CommandLine,
    pub timeout: Option<Duration>,
    pub working_dir: Option<PathBuf>,
    /// Global `env` overlaid with the task's own.
    pub env: BTreeMap<String, String>,
}

/// A validated static task.
#[derive(Debug, Clone)]
pub struct StaticTask {
    pub name: String,
    pub cron: String,
    pub one_shot: bool,
    pub spec: CommandSpec,
}

/// The configuration, checked and with defaults resolved.
#[derive(Debug)]
pub struct AgentConfig {
    pub registry: Option<String>,
    pub namespace: Option<String>,
    pub node_id: Option<String>,
    pub ip: Option<String>,
    pub weight: u32,
    pub strategy: Strategy,
    pub timezone: Tz,
    pub node_ttl: Option<Duration>,
    pub heartbeat: Option<Duration>,
    pub reload_interval: Option<Duration>,
    pub drain_timeout: Option<Duration>,
    pub catch_up: Option<CatchUp>,
    pub overlap: Overlap,
    pub handler: Option<CommandSpec>,
    pub tasks: Vec<StaticTask>,
}

fn argv_only<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match CommandLine::deserialize(d)? {
        CommandLine::Argv(argv) => Ok(argv),
        CommandLine::Shell(_) => Err(serde::de::Error::custom(
            "the handler command must be a list of program and arguments, e.g. [\"/usr/local/bin/job\", \"--flag\"]: \
             it is never run through a shell, so a payload cannot become shell code",
        )),
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Parses `"500ms"`, `"2s"`, `"1m 30s"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration `{text}` ({e}); use e.g. \"500ms\", \"2s\", \"5m\", \"1h 30m\"")
    })
}

/// Reads and checks `path`.
pub fn load(path: &Path) -> CliResult<AgentConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::invalid(format!("cannot read config file {}: {e}", path.display()))
    })?;
    parse(&text).map_err(|e| e.context(format!("config file {}", path.display())))
}

/// Parses and checks a configuration text.
pub fn parse(text: &str) -> CliResult<AgentConfig> {
    let raw: Config = toml::from_str(text)
        .map_err(|e| CliError::invalid(e.to_string().trim_end().to_string()))?;
    raw.check()
}

fn check_env(env: &BTreeMap<String, String>, what: &str) -> CliResult<()> {
    for key in env.keys() {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(CliError::invalid(format!(
                "{what}: invalid environment variable name `{key}`"
            )));
        }
        if key.starts_with("DCRON_") {
            return Err(CliError::invalid(format!(
                "{what}: `{key}`: names starting with DCRON_ are set by the agent"
            )));
        }
    }
    Ok(())
}

fn check_argv(argv: &[String], what: &str) -> CliResult<()> {
    match argv.first() {
        None => Err(CliError::invalid(format!(
            "{what}: `command` is empty; give the program and its arguments"
        ))),
        Some(p) if p.trim().is_empty() => Err(CliError::invalid(format!(
            "{what}: `command` starts with an empty program name"
        ))),
        Some(_) => Ok(()),
    }
}

fn positive(d: Option<Duration>, what: &str) -> CliResult<Option<Duration>> {
    match d {
        Some(d) if d.is_zero() => Err(CliError::invalid(format!("{what} must be positive"))),
        other => Ok(other),
    }
}

impl Config {
    fn check(self) -> CliResult<AgentConfig> {
        let strategy = match &self.strategy {
            None => Strategy::default(),
            Some(name) => crate::inspect::parse_strategy(name)?,
        };
        let timezone = match &self.timezone {
            None => Tz::UTC,
            Some(zone) => Tz::from_str(zone.trim()).map_err(|_| {
                CliError::invalid(format!(
                    "unknown timezone `{zone}`; use an IANA name such as \"Europe/Berlin\" or \"UTC\""
                ))
            })?,
        };
        let catch_up = match self.catch_up.as_deref().map(str::trim) {
            None => None,
            Some("off" | "skip" | "none") => Some(CatchUp::Skip),
            Some(spec) => {
                let (latest, window) = match spec.strip_prefix("latest ") {
                    Some(window) => (true, window.trim()),
                    None => (false, spec),
                };
                let window = parse_duration(window).map_err(|e| {
                    CliError::invalid(format!("catch_up: {e}, \"latest DURATION\" or \"off\""))
                })?;
                Some(if latest {
                    CatchUp::RunLatest { window }
                } else {
                    CatchUp::RunAll { window }
                })
            }
        };
        let overlap = match self.overlap.as_deref().map(str::trim) {
            None | Some("skip") => Overlap::Skip,
            Some("allow") => Overlap::Allow,
            Some(other) => {
                return Err(CliError::invalid(format!(
                    "overlap: unknown value `{other}`; use \"skip\" or \"allow\""
                )))
            }
        };
        for (value, what) in [(&self.namespace, "namespace"), (&self.node_id, "node_id")] {
            if let Some(v) = value {
                dcron::task::validate_name(what, v)?;
            }
        }
        let node_ttl = positive(self.node_ttl, "node_ttl")?;
        let heartbeat = positive(self.heartbeat, "heartbeat")?;
        let reload_interval = positive(self.reload_interval, "reload_interval")?;
        let timeout = positive(self.timeout, "timeout")?;
        check_env(&self.env, "env")?;
        let handler = match self.handler {
            None => None,
            Some(h) => {
                check_argv(&h.command, "[handler]")?;
                check_env(&h.env, "[handler] env")?;
                let mut env = self.env.clone();
                env.extend(h.env);
                Some(CommandSpec {
                    line: CommandLine::Argv(h.command),
                    timeout: positive(h.timeout, "[handler] timeout")?.or(timeout),
                    working_dir: h.working_dir,
                    env,
                })
            }
        };
        let mut seen = BTreeSet::new();
        let mut tasks = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            let what = format!("[[task]] `{}`", t.name);
            validate_task_name(&t.name).map_err(|e| CliError::invalid(format!("[[task]]: {e}")))?;
            if !seen.insert(t.name.clone()) {
                return Err(CliError::invalid(format!("{what} is defined twice")));
            }
            Schedule::parse(&t.cron, timezone)
                .map_err(|e| CliError::invalid(format!("{what}: {e}")))?;
            match &t.command {
                CommandLine::Shell(s) if s.trim().is_empty() => {
                    return Err(CliError::invalid(format!("{what}: `command` is empty")))
                }
                CommandLine::Shell(_) => {}
                CommandLine::Argv(argv) => check_argv(argv, &what)?,
            }
            check_env(&t.env, &format!("{what} env"))?;
            let mut env = self.env.clone();
            env.extend(t.env);
            tasks.push(StaticTask {
                name: t.name,
                cron: t.cron,
                one_shot: t.one_shot,
                spec: CommandSpec {
                    line: t.command,
                    timeout: positive(t.timeout, &format!("{what} timeout"))?.or(timeout),
                    working_dir: t.working_dir,
                    env,
                },
            });
        }
        Ok(AgentConfig {
            registry: self.registry,
            namespace: self.namespace,
            node_id: self.node_id,
            ip: self.ip,
            weight: self.weight.unwrap_or(1),
            strategy,
            timezone,
            node_ttl,
            heartbeat,
            reload_interval,
            drain_timeout: self.drain_timeout,
            catch_up,
            overlap,
            handler,
            tasks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
registry = "redis://127.0.0.1:6379"
namespace = "billing"
node_id = "worker-1"
ip = "10.0.0.5"
weight = 2
strategy = "weighted"
timezone = "Europe/Berlin"
node_ttl = "10s"
heartbeat = "2s"
reload_interval = "30s"
drain_timeout = "1m"
catch_up = "5m"
overlap = "allow"
timeout = "1h"
env = { LANG = "C.UTF-8" }

[handler]
command = ["/usr/local/bin/run-job", "--verbose"]
timeout = "5m"
working_dir = "/srv/jobs"
env = { JOB_QUEUE = "billing" }

[[task]]
name = "nightly-report"
cron = "0 3 * * *"
command = "pg_dump billing > /backups/billing.sql"
timeout = "30m"

[[task]]
name = "warm-cache"
cron = "*/10 * * * * *"
command = ["curl", "-fsS", "http://localhost:8080/warm"]
one_shot = true
env = { LANG = "C" }
"#;

    #[test]
    fn full_example() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.weight, 2);
        assert_eq!(c.strategy, Strategy::Weighted);
        assert_eq!(c.timezone, chrono_tz::Europe::Berlin);
        assert_eq!(c.node_ttl, Some(Duration::from_secs(10)));
        assert_eq!(
            c.catch_up,
            Some(CatchUp::RunAll {
                window: Duration::from_secs(300)
            })
        );
        assert_eq!(c.overlap, Overlap::Allow);
        let h = c.handler.unwrap();
        assert_eq!(h.timeout, Some(Duration::from_secs(300)));
        assert_eq!(h.env.get("LANG").map(String::as_str), Some("C.UTF-8"));
        assert_eq!(h.env.get("JOB_QUEUE").map(String::as_str), Some("billing"));
        assert_eq!(c.tasks.len(), 2);
        assert_eq!(c.tasks[0].spec.timeout, Some(Duration::from_secs(1800)));
        assert!(matches!(c.tasks[0].spec.line, CommandLine::Shell(_)));
        assert_eq!(c.tasks[1].spec.timeout, Some(Duration::from_secs(3600)));
        assert!(c.tasks[1].one_shot);
        assert_eq!(
            c.tasks[1].spec.env.get("LANG").map(String::as_str),
            Some("C")
        );
    }

    #[test]
    fn empty_is_fine() {
        let c = parse("").unwrap();
        assert_eq!(c.strategy, Strategy::Consistent);
        assert!(c.handler.is_none() && c.tasks.is_empty());
    }

    fn err(text: &str) -> String {
        let e = parse(text).unwrap_err();
        assert_eq!(e.code, 2);
        e.message
    }

    #[test]
    fn rejects_bad_input() {
        assert!(err("nod_ttl = \"2s\"").contains("unknown field `nod_ttl`"));
        assert!(err("[handler]\ncommand = [\"x\"]\ntimeuot = \"1s\"").contains("unknown field"));
        assert!(
            err("[[task]]\nname = \"a\"\ncron = \"* * * * *\"\ncommand = \"x\"\nshell = true")
                .contains("unknown field")
        );
        assert!(err("node_ttl = \"2 parsecs\"").contains("invalid duration"));
        assert!(err("strategy = \"random\"").contains("strategy `random`"));
        assert!(err("timezone = \"Mars/Olympus\"").contains("unknown timezone"));
        assert!(err("overlap = \"maybe\"").contains("overlap"));
        assert!(err("[handler]\ncommand = []").contains("empty"));
        assert!(err("[handler]\ncommand = \"run $DCRON_TASK_PAYLOAD\"")
            .contains("never run through a shell"));
        assert!(
            err("[[task]]\nname = \"a b\"\ncron = \"* * * * *\"\ncommand = \"x\"")
                .contains("invalid task name")
        );
        assert!(
            err("[[task]]\nname = \"a\"\ncron = \"99 * * * *\"\ncommand = \"x\"")
                .contains("invalid cron")
        );
        assert!(err(
            "[[task]]\nname = \"a\"\ncron = \"* * * * *\"\ncommand = \"x\"\n[[task]]\nname = \"a\"\ncron = \"* * * * *\"\ncommand = \"y\""
        )
        .contains("twice"));
        assert!(err("env = { DCRON_TASK_NAME = \"x\" }").contains("DCRON_"));
        assert!(err("node_ttl = \"0s\"").contains("positive"));
        assert!(
            err("[[task]]\nname = \"a\"\ncron = \"* * * * *\"\ncommand = 42")
                .contains("a shell command")
        );
    }
}
