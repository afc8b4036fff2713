//! `dcron agent`: a cluster node whose tasks are commands.
//!
//! Static tasks come from the config file and run their own command (shell
//! text through `/bin/sh -c`, or argv). Dynamic tasks, added with `dcron
//! add`, all run the configured handler command: an argv list, with the
//! task's name, payload and fire time in environment variables (and the
//! payload on stdin), so a payload is data and never shell code.
//!
//! Every run gets its own process group; a timeout, a forced exit or a run
//! dropped by the library kills the whole group.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dcron::{Dcron, TaskContext, TaskMeta, TaskResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::config::{self, AgentConfig, CommandLine, CommandSpec};
use crate::connect::{self, ConnectOptions, SECRET_VARS};
use crate::error::{error_chain, CliError, CliResult, EXIT_FORCED};
use crate::signals::Signals;

/// Largest payload also passed in `DCRON_TASK_PAYLOAD`: Linux refuses a
/// single environment string above 128 KiB. Larger payloads are on stdin
/// only.
const MAX_ENV_PAYLOAD: usize = 96 * 1024;
/// Longest line logged as one event; longer output is split.
const MAX_LINE: usize = 16 * 1024;
/// How long output of a finished run is still awaited (a background
/// process may hold the pipes open).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// `dcron agent` options.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The agent's configuration file (TOML).
    #[arg(long, short = 'c', env = "DCRON_CONFIG", value_name = "PATH")]
    pub config: PathBuf,
    /// This node's id; overrides `node_id` in the file (default: a random UUID).
    #[arg(long, env = "DCRON_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
    /// Check the configuration file and exit without connecting.
    #[arg(long)]
    pub check: bool,
}

/// Where a run comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Static,
    Dynamic,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Static => "static",
            Kind::Dynamic => "dynamic",
        }
    }
}

/// What every run is told about the node.
struct NodeInfo {
    ns: String,
    node_id: OnceLock<String>,
}

// ----- process groups ---------------------------------------------------

/// Process groups of runs in flight, killed on a forced exit.
static GROUPS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn groups() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    GROUPS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Kills the process group of a run unless its leader was reaped first
/// (after that the group id may be reused).
struct GroupGuard {
    pgid: Option<i32>,
}

impl GroupGuard {
    fn new(pid: Option<u32>) -> GroupGuard {
        let pgid = pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0);
        if let Some(p) = pgid {
            groups().insert(p);
        }
        GroupGuard { pgid }
    }

    fn kill(&self) {
        if let Some(p) = self.pgid {
            kill_group(p);
        }
    }

    /// The leader was reaped: forget the group.
    fn reaped(&mut self) {
        if let Some(p) = self.pgid.take() {
            groups().remove(&p);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(p) = self.pgid.take() {
            kill_group(p);
            groups().remove(&p);
        }
    }
}

fn kill_group(pgid: i32) {
    #[cfg(unix)]
    // SAFETY: kill(2) with a negative pid signals a process group; it has
    // no memory-safety preconditions.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    #[cfg(not(unix))]
    let _ = pgid;
}

/// Kills every run in flight (forced exit).
fn kill_all_groups() {
    let all: Vec<i32> = groups().iter().copied().collect();
    for p in all {
        kill_group(p);
    }
}

// ----- running commands -------------------------------------------------

fn describe(line: &CommandLine) -> String {
    match line {
        CommandLine::Shell(text) => format!("sh -c {text:?}"),
        CommandLine::Argv(argv) => format!("{argv:?}"),
    }
}

/// Logs a stream line by line, tagged with the task.
async fn pump(
    mut stream: impl AsyncRead + Unpin,
    task: Arc<str>,
    fire_time: i64,
    name: &'static str,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let log = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end_matches(['\n', '\r']);
        tracing::info!(target: "dcron::run", task = %task, fire_time, stream = name, "{text}");
    };
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            log(&buf[..pos]);
            buf.drain(..=pos);
        }
        if buf.len() >= MAX_LINE {
            log(&buf);
            buf.clear();
        }
    }
    if !buf.is_empty() {
        log(&buf);
    }
}

/// Runs one fire of a task as a child process.
async fn execute(
    spec: Arc<CommandSpec>,
    ctx: TaskContext,
    kind: Kind,
    node: Arc<NodeInfo>,
) -> TaskResult {
    let task: Arc<str> = Arc::from(ctx.name());
    let fire_time = ctx.fire_time;
    let mut cmd = match &spec.line {
        CommandLine::Shell(text) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(text);
            c
        }
        CommandLine::Argv(argv) => {
            let (program, args) = argv
                .split_first()
                .ok_or_else(|| "the command is empty".to_string())?;
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    };
    for var in SECRET_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(&spec.env);
    let payload = ctx.payload();
    cmd.env("DCRON_TASK_NAME", &*task)
        .env("DCRON_TASK_KIND", kind.as_str())
        .env("DCRON_TASK_CRON", &ctx.meta.cron_format)
        .env("DCRON_TASK_PAYLOAD_SIZE", payload.len().to_string())
        .env("DCRON_FIRE_TIME", fire_time.to_string())
        .env(
            "DCRON_FIRE_TIME_RFC3339",
            crate::output::rfc3339(fire_time).unwrap_or_default(),
        )
        .env("DCRON_NAMESPACE", &node.ns)
        .env(
            "DCRON_NODE_ID",
            node.node_id.get().map(String::as_str).unwrap_or_default(),
        );
    if payload.len() <= MAX_ENV_PAYLOAD {
        cmd.env("DCRON_TASK_PAYLOAD", payload);
    } else {
        cmd.env_remove("DCRON_TASK_PAYLOAD");
        tracing::warn!(task = %task, size = payload.len(), "payload too large for DCRON_TASK_PAYLOAD; it is on stdin only");
    }
    if let Some(dir) = &spec.working_dir {
        cmd.current_dir(dir);
    }
    let feed_stdin = kind == Kind::Dynamic;
    cmd.stdin(if feed_stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);

    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", describe(&spec.line)))?;
    let mut group = GroupGuard::new(child.id());
    tracing::info!(target: "dcron::run", task = %task, fire_time, pid = child.id(), "run started");
    if let Some(mut stdin) = child.stdin.take() {
        let bytes = payload.as_bytes().to_vec();
        tokio::spawn(async move {
            // A handler that does not read stdin is fine.
            let _ = stdin.write_all(&bytes).await;
        });
    }
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(out, task.clone(), fire_time, "stdout")));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(err, task.clone(), fire_time, "stderr")));
    }
    let waited = match spec.timeout {
        None => Ok(child.wait().await),
        Some(limit) => tokio::time::timeout(limit, child.wait()).await,
    };
    let status = match waited {
        Ok(status) => {
            group.reaped();
            status.map_err(|e| format!("waiting for the command failed: {e}"))?
        }
        Err(_) => {
            group.kill();
            let _ = child.kill().await;
            group.reaped();
            finish_output(pumps).await;
            let limit = spec.timeout.unwrap_or_default();
            return Err(format!(
                "timed out after {} and was killed",
                humantime::format_duration(limit)
            )
            .into());
        }
    };
    finish_output(pumps).await;
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if status.success() {
        tracing::info!(target: "dcron::run", task = %task, fire_time, elapsed_ms, "run succeeded");
        Ok(())
    } else {
        Err(format!("command exited with {status}").into())
    }
}

async fn finish_output(pumps: Vec<tokio::task::JoinHandle<()>>) {
    for pump in pumps {
        // Past the grace period, a pump goes on logging in the background.
        let _ = tokio::time::timeout(OUTPUT_GRACE, pump).await;
    }
}

// ----- the agent --------------------------------------------------------

/// Global options the agent uses.
pub struct AgentGlobals {
    pub registry: Option<String>,
    pub namespace: Option<String>,
    pub connect_timeout: Duration,
}

fn check_summary(cfg: &AgentConfig) -> String {
    format!(
        "configuration OK: strategy {}, weight {}, {} static task(s), dynamic task handler {}",
        cfg.strategy,
        cfg.weight,
        cfg.tasks.len(),
        cfg.handler
            .as_ref()
            .map_or_else(|| "not set".to_string(), |h| describe(&h.line)),
    )
}

/// Runs the agent until SIGINT / SIGTERM; returns the exit code.
pub async fn run(globals: AgentGlobals, args: &AgentArgs) -> CliResult<i32> {
    let cfg = config::load(&args.config)?;
    if args.check {
        crate::output::print(&format!("{}\n", check_summary(&cfg)))?;
        return Ok(0);
    }
    let url = globals.registry.or_else(|| cfg.registry.clone()).ok_or_else(|| {
        CliError::invalid(
            "no registry: pass --registry URL, set DCRON_REGISTRY, or set `registry` in the config file",
        )
    })?;
    let target = connect::parse(&url)?;
    let ns = globals
        .namespace
        .or_else(|| cfg.namespace.clone())
        .unwrap_or_else(|| dcron::DEFAULT_NAMESPACE.to_string());
    let node_id = args.node_id.clone().or_else(|| cfg.node_id.clone());

    // From here on, a signal stops the agent gracefully instead of killing it.
    let mut signals = Signals::new()?;

    let shown = connect::redact(&url);
    let opts = ConnectOptions {
        node_ttl: cfg.node_ttl,
    };
    let connecting = tokio::time::timeout(globals.connect_timeout, connect::connect(&target, opts));
    let registry = tokio::select! {
        connected = connecting => match connected {
            Ok(r) => r.map_err(|e| e.context(format!("cannot connect to {shown}")))?,
            Err(_) => {
                return Err(CliError::failure(format!(
                    "cannot connect to {shown}: no answer within {}",
                    humantime::format_duration(globals.connect_timeout)
                )))
            }
        },
        signal = signals.recv() => {
            // Nothing is registered yet: just go.
            tracing::info!(signal, "stopped while connecting");
            return Ok(0);
        }
    };

    let info = Arc::new(NodeInfo {
        ns: ns.clone(),
        node_id: OnceLock::new(),
    });
    let mut builder = Dcron::builder_shared(registry)
        .namespace(ns.clone())
        .strategy(cfg.strategy)
        .weight(cfg.weight)
        .timezone(cfg.timezone)
        .overlap(cfg.overlap)
        .error_handler(|meta: &TaskMeta, err: &dcron::Error| {
            tracing::error!(target: "dcron::run", task = %meta.name, error = %error_chain(err), "run failed");
        });
    if let Some(id) = node_id {
        builder = builder.node_id(id);
    }
    if let Some(ip) = cfg.ip.clone() {
        builder = builder.ip(ip);
    }
    if let Some(ttl) = cfg.node_ttl {
        builder = builder.node_ttl(ttl);
    }
    if let Some(every) = cfg.heartbeat {
        builder = builder.heartbeat(every);
    }
    if let Some(every) = cfg.reload_interval {
        builder = builder.reload_interval(every);
    }
    if let Some(limit) = cfg.drain_timeout {
        builder = builder.drain_timeout(limit);
    }
    if let Some(policy) = cfg.catch_up {
        builder = builder.catch_up(policy);
    }
    match &cfg.handler {
        Some(handler) => {
            let spec = Arc::new(handler.clone());
            let info = info.clone();
            builder = builder.task_handler(move |ctx: TaskContext| {
                execute(spec.clone(), ctx, Kind::Dynamic, info.clone())
            });
        }
        None => tracing::warn!(
            "no [handler] in the config: dynamic tasks this node is assigned will fail; add one or run this node in its own namespace"
        ),
    }
    let node = builder.build()?;
    let _ = info.node_id.set(node.node_id());

    for task in &cfg.tasks {
        let spec = Arc::new(task.spec.clone());
        let info = info.clone();
        let body = move |ctx: TaskContext| execute(spec.clone(), ctx, Kind::Static, info.clone());
        let added = if task.one_shot {
            node.add_one_shot_task(&task.name, &task.cron, body).await
        } else {
            node.add_task(&task.name, &task.cron, body).await
        };
        match added {
            Ok(()) => {}
            Err(dcron::Error::TaskDeleted(name)) => tracing::warn!(
                task = %name,
                "task is marked deleted in the cluster (a one-shot that ran, or `dcron delete`); not scheduling it here. `dcron reuse {name}` and a restart bring it back"
            ),
            Err(err) => {
                return Err(CliError::from(err).context(format!("static task `{}`", task.name)))
            }
        }
    }

    node.start()
        .await
        .map_err(|e| CliError::from(e).context(format!("cannot join the cluster at {shown}")))?;
    tracing::info!(
        node = %node.node_id(),
        namespace = %ns,
        registry = %shown,
        backend = target.backend(),
        strategy = %cfg.strategy,
        static_tasks = cfg.tasks.len(),
        "agent started"
    );

    let signal = signals.recv().await;
    tracing::info!(
        signal,
        "stopping gracefully: leaving, waiting for running tasks, unregistering; send another signal to exit at once"
    );
    tokio::select! {
        stopped = node.stop() => match stopped {
            Ok(()) => {
                tracing::info!(node = %node.node_id(), "agent stopped");
                Ok(0)
            }
            Err(err) => Err(CliError::from(err).context("graceful stop failed")),
        },
        signal = signals.recv() => {
            tracing::warn!(signal, "second signal: killing running tasks and exiting now");
            kill_all_groups();
            Ok(EXIT_FORCED)
        }
    }
}
