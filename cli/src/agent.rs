//! `dcron agent`: a cluster node whose tasks are commands.
//!
//! Static tasks come from the config file and run their own command (shell
//! text through `/bin/sh -c`, or argv). Dynamic tasks, added with `dcron
//! add`, all run the configured handler command: an argv list, with the
//! task's name, payload and fire time in environment variables (and the
//! payload on stdin), so a payload is data and never shell code.
//!
//! Every run gets its own process group; a timeout, a forced exit, the end
//! of the drain timeout or a run dropped by the library kills the whole
//! group.
//!
//! # Signals
//!
//! SIGTERM, SIGINT and SIGHUP all stop the agent the same graceful way
//! (see [`STOP_HELP`], also in `dcron agent --help`):
//!
//! 1. publish `leaving` (the other nodes take its tasks over at once) and
//!    stop firing;
//! 2. wait for running commands, up to `drain_timeout` from the signal;
//! 3. SIGKILL the process group of every command still running;
//! 4. unregister and exit 0 (1 if the registry failed while leaving).
//!
//! A SIGINT or SIGTERM during the stop kills every command's group at once
//! and exits 130. A SIGHUP during the stop is ignored: closing a terminal
//! can deliver two (the shell forwards one, the kernel sends another when
//! the shell exits), and that must not skip the drain.
//!
//! SIGHUP is not a config reload: most settings (registry, namespace, node
//! id, strategy, weight, TTLs) only change by leaving the cluster and
//! joining again, which is what a restart does, and a reload that applies
//! half of a file is worse than none. An agent that loses its terminal
//! (the other meaning of SIGHUP) stops cleanly instead of dying mid-run.
//!
//! # Children when the agent dies
//!
//! On Linux every command is started with `PR_SET_PDEATHSIG = SIGKILL`, so
//! the command dies with the agent even when the agent is SIGKILLed (or
//! crashes). Commands are spawned from one dedicated thread that lives as
//! long as the process, since the kernel ties that signal to the spawning
//! *thread*, not the process. What cannot be covered from inside the
//! agent: the command's own children (the `sleep` of
//! `sh -c 'sleep 100 & wait'`) do not inherit the death signal, and
//! nothing runs in a SIGKILLed process to kill their group, so they are
//! reparented to init; nor can a command that leaves its process group
//! (`setsid`) be reached by the group kill. A supervisor that kills the
//! whole cgroup (systemd's default `KillMode=control-group`, a container
//! runtime) covers both. Other Unix systems get the process groups only.

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
use crate::signals::{self, Signals};

/// Largest payload also passed in `DCRON_TASK_PAYLOAD`: Linux refuses a
/// single environment string above 128 KiB. Larger payloads are on stdin
/// only.
const MAX_ENV_PAYLOAD: usize = 96 * 1024;
/// Longest line logged as one event; longer output is split.
const MAX_LINE: usize = 16 * 1024;
/// How long output of a finished run is still awaited (a background
/// process may hold the pipes open).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// What the agent does on signals; shown by `dcron agent --help`.
pub const STOP_HELP: &str = "\
Signals:
  SIGTERM, SIGINT and SIGHUP stop the agent gracefully: it publishes `leaving`
  (the other nodes take its tasks over at once) and stops firing, waits for
  running commands up to `drain_timeout` (default 30s) from the signal, kills
  the process group of every command still running, unregisters and exits 0
  (1 if the registry failed while leaving). A SIGINT or SIGTERM during the
  stop kills every command at once and exits 130 (a repeated SIGHUP does not:
  closing a terminal may send two).
  SIGHUP is not a config reload (most settings need the node to leave and
  rejoin the cluster): restart the agent to apply a changed config file.

Commands:
  Each command runs in its own process group, so killing it kills its
  children too. On Linux a command also gets SIGKILL if the agent dies, even
  by SIGKILL; the command's own children cannot be covered that way: run the
  agent under a supervisor that kills its whole cgroup (systemd's default
  KillMode=control-group, a container) for that.";

/// Library default of `drain_timeout`, made explicit because the agent
/// enforces the same bound itself (see [`stop`]).
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than the agent's own drain bound the library's drain
/// waits: time for runs killed at the bound to end.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);
/// How long the agent waits for killed commands to be reaped before it
/// exits (a SIGKILLed process group dies at once; this only avoids leaving
/// zombies to init).
const REAP_GRACE: Duration = Duration::from_secs(2);

/// `dcron agent` options.
#[derive(Debug, clap::Args)]
#[command(after_help = STOP_HELP)]
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

/// Kills every run in flight (forced exit, end of the drain); returns how
/// many there were.
fn kill_all_groups() -> usize {
    let all: Vec<i32> = groups().iter().copied().collect();
    for p in &all {
        kill_group(*p);
    }
    all.len()
}

/// Waits up to `limit` for the leaders of killed runs to be reaped (their
/// runs then end and forget their groups). Returns how many are left.
async fn await_reaped(limit: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = groups().len();
        if left == 0 || tokio::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ----- spawning ---------------------------------------------------------

/// A started command and the guard of its process group.
type Spawned = std::io::Result<(tokio::process::Child, GroupGuard)>;
type SpawnJob = (Command, tokio::sync::oneshot::Sender<Spawned>);

/// The thread every command is spawned from (see [`spawn`]); `None` if it
/// could not be started.
static SPAWNER: OnceLock<Option<std::sync::mpsc::Sender<SpawnJob>>> = OnceLock::new();

fn spawn_now(cmd: &mut Command) -> Spawned {
    let child = cmd.spawn()?;
    // Known to a forced exit from the first moment; if the run is gone by
    // the time this reaches it, dropping the guard kills the group.
    let group = GroupGuard::new(child.id());
    Ok((child, group))
}

fn spawner() -> Option<&'static std::sync::mpsc::Sender<SpawnJob>> {
    SPAWNER
        .get_or_init(|| {
            let runtime = tokio::runtime::Handle::try_current().ok()?;
            let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
            let started = std::thread::Builder::new()
                .name("dcron-spawn".into())
                .spawn(move || {
                    // Pipes and the child's reaper register with the runtime.
                    let _entered = runtime.enter();
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(spawn_now(&mut cmd));
                    }
                });
            match started {
                Ok(_) => Some(tx),
                Err(err) => {
                    tracing::warn!(%err, "cannot start the spawning thread; commands are spawned from the runtime's threads");
                    None
                }
            }
        })
        .as_ref()
}

/// Spawns `cmd` from a thread that lives as long as the process: Linux
/// sends the `PR_SET_PDEATHSIG` signal when the thread that forked the
/// child ends, not the process, and the runtime's threads may come and go.
async fn spawn(mut cmd: Command) -> Spawned {
    die_with_agent(&mut cmd);
    if let Some(tx) = spawner() {
        let (reply, answer) = tokio::sync::oneshot::channel();
        match tx.send((cmd, reply)) {
            Ok(()) => {
                return answer
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread is gone")))
            }
            Err(std::sync::mpsc::SendError((back, _))) => cmd = back,
        }
    }
    spawn_now(&mut cmd)
}

/// Makes the kernel SIGKILL the command when the agent dies, however it
/// dies (Linux only).
#[cfg(target_os = "linux")]
fn die_with_agent(cmd: &mut Command) {
    // SAFETY: getpid(2) has no preconditions.
    let agent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec; it only
    // calls async-signal-safe functions (prctl, getppid) and neither
    // allocates nor takes locks (an `Os` io::Error is a plain integer).
    unsafe {
        cmd.pre_exec(move || {
            let (kill, zero) = (libc::SIGKILL as libc::c_ulong, 0 as libc::c_ulong);
            if libc::prctl(libc::PR_SET_PDEATHSIG, kill, zero, zero, zero) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent died between fork and prctl: the signal was missed.
            if libc::getppid() != agent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_agent(_cmd: &mut Command) {}

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
    // An environment string can hold neither a NUL byte nor more than
    // 128 KiB: such payloads are on stdin only.
    if payload.contains('\0') {
        cmd.env_remove("DCRON_TASK_PAYLOAD");
        tracing::warn!(task = %task, size = payload.len(), "payload contains a NUL byte, which an environment variable cannot carry; it is on stdin only");
    } else if payload.len() <= MAX_ENV_PAYLOAD {
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
    let (mut child, mut group) = spawn(cmd)
        .await
        .map_err(|e| format!("cannot start {}: {e}", describe(&spec.line)))?;
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

/// What `--check` can tell without running anything: working directories
/// and programs that do not exist on this host (the config may be meant
/// for another one, so these are warnings, not errors).
fn check_warnings(cfg: &AgentConfig) -> Vec<String> {
    let handler = cfg.handler.iter().map(|h| ("the handler".to_string(), h));
    let tasks = cfg
        .tasks
        .iter()
        .map(|t| (format!("task `{}`", t.name), &t.spec));
    let mut warnings = Vec::new();
    for (what, spec) in handler.chain(tasks) {
        if let Some(dir) = &spec.working_dir {
            if !dir.is_dir() {
                warnings.push(format!(
                    "{what}: working_dir `{}` is not a directory here",
                    dir.display()
                ));
            }
        }
        let program = match &spec.line {
            CommandLine::Shell(_) => "/bin/sh",
            CommandLine::Argv(argv) => match argv.first() {
                Some(p) => p.as_str(),
                None => continue,
            },
        };
        if !program_exists(program, spec) {
            warnings.push(format!("{what}: program `{program}` is not found here"));
        }
    }
    warnings
}

/// Whether `program` would be found when `spec` runs: a path (relative to
/// the working directory), or a name on the `PATH` the command gets.
fn program_exists(program: &str, spec: &CommandSpec) -> bool {
    let path = std::path::Path::new(program);
    if program.contains('/') {
        let full = match (&spec.working_dir, path.is_relative()) {
            (Some(dir), true) => dir.join(path),
            _ => path.to_path_buf(),
        };
        return full.is_file();
    }
    let search = spec
        .env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    std::env::split_paths(&search).any(|dir| dir.join(program).is_file())
}

/// Runs the agent until SIGINT / SIGTERM / SIGHUP; returns the exit code.
pub async fn run(globals: AgentGlobals, args: &AgentArgs) -> CliResult<i32> {
    let cfg = config::load(&args.config)?;
    if args.check {
        for warning in check_warnings(&cfg) {
            eprintln!("warning: {warning}");
        }
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
    // The agent enforces the drain bound itself, from the signal (see
    // `stop`); the library waits a little longer so that it sees the killed
    // runs end instead of reporting them as left running.
    let drain = cfg.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT);
    builder = builder.drain_timeout(drain + DRAIN_MARGIN);
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
        drain_timeout = %humantime::format_duration(drain),
        "stopping gracefully: leaving, waiting for running tasks, unregistering; send SIGINT or SIGTERM again to exit at once"
    );
    let code = stop(&node, drain, &mut signals).await;
    // Whatever is still running now (a failed stop, a run the library let
    // go) dies with its group rather than outliving the agent.
    let killed = kill_all_groups();
    if killed > 0 {
        tracing::warn!(runs = killed, "killed runs still going at exit");
    }
    let left = await_reaped(REAP_GRACE).await;
    if left > 0 {
        tracing::warn!(runs = left, "killed runs not reaped yet; exiting anyway");
    }
    code
}

/// The graceful stop after a signal: `leaving`, the drain (bounded by
/// `drain` from now, after which the runs left are killed, group and
/// all), unregistering. A SIGINT / SIGTERM meanwhile kills every run and
/// returns [`EXIT_FORCED`]; a SIGHUP is ignored.
async fn stop(node: &Dcron, drain: Duration, signals: &mut Signals) -> CliResult<i32> {
    let stopping = node.stop();
    tokio::pin!(stopping);
    // The library's own drain starts after `leaving` is published; the
    // bound an operator sets (and a supervisor's stop timeout is sized
    // against) counts from the signal.
    let drain_end = tokio::time::sleep(drain);
    tokio::pin!(drain_end);
    let mut drained = false;
    loop {
        tokio::select! {
            stopped = &mut stopping => {
                return match stopped {
                    Ok(()) => {
                        tracing::info!(node = %node.node_id(), "agent stopped");
                        Ok(0)
                    }
                    Err(err) => Err(CliError::from(err).context("graceful stop failed")),
                };
            }
            () = &mut drain_end, if !drained => {
                drained = true;
                let killed = kill_all_groups();
                if killed > 0 {
                    tracing::warn!(
                        runs = killed,
                        drain_timeout = %humantime::format_duration(drain),
                        "drain timeout: killing the runs still going, with their process groups"
                    );
                }
            }
            signal = signals.recv() => {
                if signal == signals::HANGUP {
                    tracing::info!(signal, "already stopping; a hangup does not force the exit (SIGINT or SIGTERM does)");
                    continue;
                }
                tracing::warn!(signal, "second signal: killing running tasks and exiting now");
                kill_all_groups();
                return Ok(EXIT_FORCED);
            }
        }
    }
}
