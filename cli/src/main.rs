//! `dcron`: inspect and steer a dcron cluster, or run a node as a daemon.

mod agent;
mod config;
mod connect;
mod error;
mod inspect;
mod ops;
mod output;
mod signals;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use dcron::Registry;

use crate::error::{CliError, CliResult};
use crate::output::Format;

const ABOUT: &str = "Distributed cron on Redis, etcd, ZooKeeper or Consul: inspect and steer a cluster, or run a node";

const AFTER_HELP: &str = "\
Registry URLs:
  redis://[user[:password]@]host[:port][/db]   rediss://... (TLS)
  etcd://[user@]host:port[,host:port...]
  zk://[user@]host:port[,host:port...][/chroot]
  consul://host:port[?dc=DC]                    consul+https://host:port[?dc=DC]

Secrets come from the environment and are never printed:
  DCRON_REDIS_USERNAME, DCRON_REDIS_PASSWORD, DCRON_ETCD_USER, DCRON_ETCD_PASSWORD,
  DCRON_ZK_USER, DCRON_ZK_PASSWORD, DCRON_CONSUL_TOKEN (or CONSUL_HTTP_TOKEN)

Exit codes: 0 ok, 1 registry or system failure, 2 invalid input,
3 conflict (task exists / is marked deleted), 130 agent forced to exit.";

#[derive(Debug, Parser)]
#[command(name = "dcron", version, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

/// The heading of the options every subcommand takes.
const GLOBAL: &str = "Global options";

#[derive(Debug, clap::Args)]
struct Global {
    /// Registry URL (`dcron --help` lists the forms).
    #[arg(
        long,
        short = 'r',
        env = "DCRON_REGISTRY",
        global = true,
        value_name = "URL",
        hide_env_values = true,
        help_heading = GLOBAL
    )]
    registry: Option<String>,
    /// Namespace of the cluster [default: dcron].
    #[arg(
        long,
        short = 'n',
        env = "DCRON_NAMESPACE",
        global = true,
        value_name = "NS",
        hide_env_values = true,
        help_heading = GLOBAL
    )]
    namespace: Option<String>,
    /// Output format of nodes, tasks, watch and the operations.
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Table, global = true, help_heading = GLOBAL)]
    output: Format,
    /// Bound on connecting and on each command's registry calls.
    #[arg(long, default_value = "30s", value_parser = duration_arg, global = true, value_name = "DURATION", help_heading = GLOBAL)]
    timeout: Duration,
    /// Log format (logs go to stderr; filter with DCRON_LOG or RUST_LOG, e.g. `debug`).
    #[arg(long, value_enum, env = "DCRON_LOG_FORMAT", default_value_t = LogFormat::Text, global = true, hide_env_values = true, help_heading = GLOBAL)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List live nodes: id, ip, hostname, status, weight, when registered, tasks owned.
    Nodes {
        /// Compute owners with this strategy instead of the one the nodes publish.
        #[arg(long, value_name = "NAME")]
        strategy: Option<String>,
    },
    /// List tasks: schedule, kind, flags, owner, next fire time, last run.
    Tasks {
        /// Compute owners with this strategy instead of the one the nodes publish.
        #[arg(long, value_name = "NAME")]
        strategy: Option<String>,
        /// Zone of cron expressions without CRON_TZ= (the agents' `timezone`).
        #[arg(long, default_value = "UTC", value_name = "ZONE")]
        timezone: String,
    },
    /// Stream node and task changes as they happen (until Ctrl-C).
    Watch {
        /// Print the current nodes and tasks first.
        #[arg(long)]
        snapshot: bool,
    },
    /// Add a dynamic task, run by the agents' handler command.
    Add {
        /// Task name: 1-200 characters of A-Z a-z 0-9 . _ : @ -
        name: String,
        /// Cron expression: 5 fields, 6 with seconds first, or @hourly etc.; optional `CRON_TZ=Zone ` prefix.
        cron: String,
        /// Data handed to the handler (DCRON_TASK_PAYLOAD and stdin).
        #[arg(long, conflicts_with = "payload_file")]
        payload: Option<String>,
        /// Read the payload from a file (`-` for stdin).
        #[arg(long, value_name = "PATH")]
        payload_file: Option<PathBuf>,
        /// Run once in the whole cluster, then mark the task deleted.
        #[arg(long)]
        one_shot: bool,
        /// Mark the task deleted after each run (`dcron reuse` revives it).
        #[arg(long)]
        delete_after_run: bool,
        /// Remove every trace of the task after its run.
        #[arg(long)]
        cleanup_after_run: bool,
        /// Overwrite: clear the deletion mark and last run, replace any definition.
        #[arg(long)]
        force: bool,
        /// Largest accepted payload in bytes.
        #[arg(long, default_value_t = dcron::task::DEFAULT_MAX_PAYLOAD, value_name = "BYTES")]
        max_payload: usize,
    },
    /// Mark a task deleted: it stops everywhere and plain adds of the name fail.
    Delete {
        /// Task name.
        name: String,
    },
    /// Remove a task's deletion mark so it runs again.
    Reuse {
        /// Task name.
        name: String,
    },
    /// Remove every trace of a task: definition, deletion mark, last run.
    Cleanup {
        /// Task name.
        name: String,
    },
    /// Run a node: join the cluster and run static tasks and the dynamic task handler.
    Agent(agent::AgentArgs),
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    let d = config::parse_duration(text)?;
    if d.is_zero() {
        return Err("must be positive".into());
    }
    Ok(d)
}

fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("DCRON_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .unwrap_or_else(|| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Connects for a one-off command, bounded by `--timeout`.
async fn open(global: &Global) -> CliResult<(Arc<dyn Registry>, String)> {
    let url = global.registry.clone().ok_or_else(|| {
        CliError::invalid("no registry: pass --registry URL or set DCRON_REGISTRY")
    })?;
    let target = connect::parse(&url)?;
    let ns = global
        .namespace
        .clone()
        .unwrap_or_else(|| dcron::DEFAULT_NAMESPACE.to_string());
    dcron::task::validate_name("namespace", &ns)?;
    let shown = connect::redact(&url);
    let registry = bounded(
        global.timeout,
        connect::connect(&target, connect::ConnectOptions::default()),
    )
    .await
    .map_err(|e| e.context(format!("cannot connect to {shown}")))?;
    Ok((registry, ns))
}

/// Runs `fut` with the `--timeout` bound.
async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = CliResult<T>>,
) -> CliResult<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => Err(CliError::failure(format!(
            "no answer from the registry within {} (see --timeout)",
            humantime::format_duration(limit)
        ))),
    }
}

async fn run(cli: Cli) -> CliResult<i32> {
    let global = &cli.global;
    let format = global.output;
    let limit = global.timeout;
    match &cli.command {
        Cmd::Agent(args) => {
            agent::run(
                agent::AgentGlobals {
                    registry: global.registry.clone(),
                    namespace: global.namespace.clone(),
                    connect_timeout: limit,
                },
                args,
            )
            .await
        }
        Cmd::Add {
            name,
            cron,
            payload,
            payload_file,
            one_shot,
            delete_after_run,
            cleanup_after_run,
            force,
            max_payload,
        } => {
            let req = ops::AddRequest {
                name: name.clone(),
                cron: cron.clone(),
                payload: payload.clone(),
                payload_file: payload_file.clone(),
                one_shot: *one_shot,
                delete_after_run: *delete_after_run,
                cleanup_after_run: *cleanup_after_run,
                force: *force,
                max_payload: *max_payload,
            };
            // Bad input fails before anything is contacted or written.
            req.prepare()?;
            let (registry, ns) = open(global).await?;
            bounded(limit, ops::add(registry, &ns, &req, format)).await?;
            Ok(0)
        }
        Cmd::Delete { name } | Cmd::Reuse { name } | Cmd::Cleanup { name } => {
            dcron::task::validate_task_name(name)?;
            let (registry, ns) = open(global).await?;
            let fut = async {
                match &cli.command {
                    Cmd::Delete { .. } => ops::delete(registry, &ns, name, format).await,
                    Cmd::Reuse { .. } => ops::reuse(registry, &ns, name, format).await,
                    _ => ops::cleanup(registry, &ns, name, format).await,
                }
            };
            bounded(limit, fut).await?;
            Ok(0)
        }
        Cmd::Nodes { strategy } => {
            if let Some(s) = strategy {
                inspect::parse_strategy(s)?;
            }
            let (registry, ns) = open(global).await?;
            let snap = bounded(limit, inspect::Snapshot::load(&registry, &ns)).await?;
            let strategy = inspect::cluster_strategy(&snap.nodes, strategy.as_deref())?;
            inspect::nodes(&snap, &strategy, format)?;
            Ok(0)
        }
        Cmd::Tasks { strategy, timezone } => {
            if let Some(s) = strategy {
                inspect::parse_strategy(s)?;
            }
            let tz: chrono_tz::Tz = timezone.trim().parse().map_err(|_| {
                CliError::invalid(format!(
                    "unknown timezone `{timezone}`; use an IANA name such as Europe/Berlin"
                ))
            })?;
            let (registry, ns) = open(global).await?;
            let snap = bounded(limit, inspect::Snapshot::load(&registry, &ns)).await?;
            let strategy = inspect::cluster_strategy(&snap.nodes, strategy.as_deref())?;
            inspect::tasks(&snap, &strategy, tz, format)?;
            Ok(0)
        }
        Cmd::Watch { snapshot } => {
            let (registry, ns) = open(global).await?;
            watch::run(registry, &ns, format, *snapshot).await?;
            Ok(0)
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Cmd::Agent(_) => "info",
        _ => "warn",
    };
    init_logging(cli.global.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(error::EXIT_FAILURE);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            err.code
        }
    };
    // Do not wait for background work (watch feeds, output pumps).
    runtime.shutdown_timeout(Duration::from_millis(200));
    std::process::exit(code);
}
