//! End-to-end tests of the `dcron` binary: real `dcron agent` processes on
//! a real registry, driven with `dcron add / delete / reuse / cleanup` and
//! checked with `dcron tasks / nodes / watch --output json` and the files
//! the agents' commands write.
//!
//! Redis carries the full set; etcd, ZooKeeper and Consul run the cluster
//! scenarios too (Consul only the steady-state one: its sessions live at
//! least 10 s, so a takeover takes up to 20 s).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use support::*;

const EVERY_SECOND: &str = "* * * * * *";

fn fires_of<'a>(fires: &'a [Fire], task: &str) -> Vec<&'a Fire> {
    fires.iter().filter(|f| f.task == task).collect()
}

// ----- scenarios ----------------------------------------------------------

/// Three agents run dynamic and static tasks, each fire once; one agent is
/// SIGKILLed and its tasks move to the others; one is stopped with SIGTERM
/// and leaves at once.
fn takeover(registry: &str, name: &str) {
    let cluster = Cluster::new(registry, name);
    let dir = Scratch::new(name);
    let fires = dir.path("fires");
    let static_task = format!(
        "[[task]]\nname = \"static-tick\"\ncron = \"{EVERY_SECOND}\"\n\
         command = \"printf '%s %s %s\\\\n' \\\"$DCRON_TASK_NAME\\\" \\\"$DCRON_FIRE_TIME\\\" \\\"$DCRON_NODE_ID\\\" >> \\\"$FIRES\\\"\"\n"
    );
    let config = agent_config(&fires, &static_task);
    let mut agents: BTreeMap<String, Agent> = ["a1", "a2", "a3"]
        .iter()
        .map(|id| (id.to_string(), cluster.agent(&dir, id, &config)))
        .collect();
    let all: BTreeSet<String> = agents.keys().cloned().collect();
    assert!(
        wait_until(Duration::from_secs(30), || cluster.working() == all),
        "agents did not all start: {:?}",
        cluster.nodes()
    );

    let dynamic: Vec<String> = (0..6).map(|i| format!("job-{i}")).collect();
    for task in &dynamic {
        cluster.ok(&["add", task, EVERY_SECOND, "--payload", "p"]);
    }
    let mut every: Vec<String> = dynamic.clone();
    every.push("static-tick".into());

    // Every task fires, on its owner only.
    assert!(
        wait_until(Duration::from_secs(20), || {
            let f = read_fires(&fires);
            every.iter().all(|t| fires_of(&f, t).len() >= 3)
        }),
        "not every task fired 3 times: {:?}",
        read_fires(&fires)
    );
    let tasks = cluster.tasks();
    for t in &every {
        let row = &tasks[t];
        assert_eq!(row["owner_known"], true, "{row}");
        let owner = row["owner"].as_str().expect("owner");
        assert!(all.contains(owner), "{row}");
        assert!(row["last_run"]["fire_time"].as_i64().is_some(), "{row}");
        assert_eq!(row["deleted"], false);
    }
    assert_eq!(tasks["job-0"]["kind"], "dynamic");
    assert_eq!(tasks["job-0"]["cron"], EVERY_SECOND);
    assert_eq!(tasks["static-tick"]["kind"], "static");
    assert_eq!(
        tasks["static-tick"]["defined_by"].as_array().map(Vec::len),
        Some(3)
    );
    let nodes = cluster.nodes();
    let owned: u64 = nodes
        .values()
        .map(|n| n["tasks_owned"].as_u64().expect("owner count"))
        .sum();
    assert_eq!(owned, every.len() as u64, "{nodes:?}");
    assert_no_duplicates(&read_fires(&fires));

    // Crash the owner of job-0.
    let victim = tasks["job-0"]["owner"].as_str().expect("owner").to_string();
    let victim_tasks: Vec<String> = every
        .iter()
        .filter(|t| tasks[t.as_str()]["owner"] == victim.as_str())
        .cloned()
        .collect();
    agents.get_mut(&victim).expect("victim").crash();
    let survivors: BTreeSet<String> = all.iter().filter(|id| **id != victim).cloned().collect();
    assert!(
        wait_until(Duration::from_secs(20), || cluster
            .nodes()
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
            == survivors),
        "crashed node {victim} did not expire: {:?}",
        cluster.nodes()
    );
    let expired_at = now_ms();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let f = read_fires(&fires);
            every.iter().all(|t| {
                fires_of(&f, t)
                    .iter()
                    .any(|x| x.fire_time > expired_at + 1000 && survivors.contains(&x.node))
            })
        }),
        "tasks of {victim} ({victim_tasks:?}) were not taken over: {:?}",
        read_fires(&fires)
    );
    let tasks = cluster.tasks();
    for t in &every {
        let owner = tasks[t.as_str()]["owner"].as_str().expect("owner");
        assert!(survivors.contains(owner), "{t} still owned by {owner}");
    }

    // A graceful stop leaves at once, without waiting for the TTL.
    let leaver = survivors.iter().next().expect("a survivor").clone();
    let last: String = survivors.iter().nth(1).expect("two survivors").clone();
    let agent = agents.get_mut(&leaver).expect("leaver");
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(15))
        .expect("agent stops on SIGTERM");
    assert!(status.success(), "graceful stop exited with {status}");
    assert!(agent.log_text().contains("agent stopped"));
    let nodes: BTreeSet<String> = cluster.nodes().keys().cloned().collect();
    assert_eq!(
        nodes,
        BTreeSet::from([last.clone()]),
        "stopped node still listed"
    );
    let stopped_at = now_ms();
    assert!(
        wait_until(Duration::from_secs(15), || {
            let f = read_fires(&fires);
            every.iter().all(|t| {
                fires_of(&f, t)
                    .iter()
                    .any(|x| x.fire_time > stopped_at + 1000 && x.node == last)
            })
        }),
        "the last node did not take every task over"
    );
    assert_no_duplicates(&read_fires(&fires));
    let stdout = agents[&last].log_text();
    assert!(
        stdout.contains("task=job-"),
        "runs are logged with the task name"
    );
}

/// Two agents; tasks fire once each; `delete` stops a task everywhere,
/// `reuse` brings it back; SIGTERM stops both agents cleanly.
fn steady_state(registry: &str, name: &str) {
    let cluster = Cluster::new(registry, name);
    let dir = Scratch::new(name);
    let fires = dir.path("fires");
    let config = agent_config(&fires, "");
    let mut agents: Vec<Agent> = ["s1", "s2"]
        .iter()
        .map(|id| cluster.agent(&dir, id, &config))
        .collect();
    let all = BTreeSet::from(["s1".to_string(), "s2".to_string()]);
    assert!(
        wait_until(Duration::from_secs(40), || cluster.working() == all),
        "agents did not start: {:?}",
        cluster.nodes()
    );
    for t in ["alpha", "beta", "gamma"] {
        cluster.ok(&["add", t, EVERY_SECOND]);
    }
    assert!(
        wait_until(Duration::from_secs(30), || {
            let f = read_fires(&fires);
            ["alpha", "beta", "gamma"]
                .iter()
                .all(|t| fires_of(&f, t).len() >= 2)
        }),
        "tasks did not fire: {:?}",
        read_fires(&fires)
    );
    cluster.ok(&["delete", "beta"]);
    let deleted_at = now_ms();
    assert_eq!(cluster.tasks()["beta"]["deleted"], true);
    assert_eq!(cluster.tasks()["beta"]["owner"], Value::Null);
    std::thread::sleep(Duration::from_secs(3));
    let late: Vec<Fire> = read_fires(&fires)
        .into_iter()
        .filter(|f| f.task == "beta" && f.fire_time > deleted_at + 1500)
        .collect();
    assert!(late.is_empty(), "beta ran after delete: {late:?}");
    cluster.ok(&["reuse", "beta"]);
    let reused_at = now_ms();
    assert!(
        wait_until(Duration::from_secs(15), || read_fires(&fires)
            .iter()
            .any(|f| f.task == "beta" && f.fire_time > reused_at)),
        "beta did not run again after reuse"
    );
    assert_no_duplicates(&read_fires(&fires));
    for agent in &agents {
        agent.signal(libc::SIGTERM);
    }
    for agent in &mut agents {
        let status = agent
            .wait_exit(Duration::from_secs(20))
            .expect("agent stops");
        assert!(status.success(), "agent {} exited with {status}", agent.id);
    }
    assert!(
        cluster.nodes().is_empty(),
        "stopped agents still registered"
    );
}

/// Bad input exits non-zero with the library's message and writes nothing.
fn invalid_input(registry: &str, name: &str) {
    let cluster = Cluster::new(registry, name);
    let dir = Scratch::new(name);
    let err = cluster.fails(&["add", "bad name", EVERY_SECOND], 2);
    assert!(err.contains("invalid task name"), "{err}");
    let err = cluster.fails(&["add", "ok", "61 * * * *"], 2);
    assert!(err.contains("invalid cron expression"), "{err}");
    let err = cluster.fails(&["add", "ok", "0 0 30 2 *"], 2);
    assert!(err.contains("invalid cron expression"), "{err}");
    let err = cluster.fails(
        &[
            "add",
            "ok",
            EVERY_SECOND,
            "--payload",
            "12345",
            "--max-payload",
            "4",
        ],
        2,
    );
    assert!(err.contains("exceeds the limit"), "{err}");
    let big = dir.path("big");
    std::fs::write(&big, vec![b'x'; 64 * 1024 + 1]).expect("write payload");
    let err = cluster.fails(
        &[
            "add",
            "ok",
            EVERY_SECOND,
            "--payload-file",
            big.to_str().expect("path"),
        ],
        2,
    );
    assert!(err.contains("exceeds the limit"), "{err}");
    cluster.fails(
        &[
            "add",
            "ok",
            EVERY_SECOND,
            "--payload",
            "a",
            "--payload-file",
            "-",
        ],
        2,
    );
    cluster.fails(&["delete", "a/b"], 2);
    cluster.fails(&["reuse", ""], 2);
    cluster.fails(&["cleanup", "x y"], 2);
    cluster.fails(&["tasks", "--strategy", "random"], 2);
    cluster.fails(&["tasks", "--timezone", "Mars/Base"], 2);
    let mut slash = Cluster::new(registry, name);
    slash.ns = "no/slash".into();
    let err = slash.fails(&["tasks"], 2);
    assert!(err.contains("namespace"), "{err}");

    // Other registries are refused before anything happens.
    let mut bad = Cluster::new("memory://", name);
    let err = bad.fails(&["add", "ok", EVERY_SECOND], 2);
    assert!(err.contains("cannot share"), "{err}");
    bad.registry = "mysql://localhost".into();
    bad.fails(&["tasks"], 2);
    bad.registry = "etcd://root:hunter2@127.0.0.1:1".into();
    let err = bad.fails(&["tasks"], 2);
    assert!(!err.contains("hunter2"), "password echoed: {err}");

    // An invalid agent config is refused, and no node registers.
    let conf = dir.path("bad.toml");
    std::fs::write(&conf, "node_ttl = \"2s\"\nnode_tll = \"3s\"\n").expect("write config");
    let conf = conf.to_str().expect("path");
    let err = cluster.fails(&["agent", "--config", conf, "--check"], 2);
    assert!(err.contains("unknown field `node_tll`"), "{err}");
    let err = cluster.fails(&["agent", "--config", conf], 2);
    assert!(err.contains("unknown field"), "{err}");
    let conf2 = dir.path("bad2.toml");
    std::fs::write(
        &conf2,
        "[[task]]\nname = \"t\"\ncron = \"* * *\"\ncommand = \"true\"\n",
    )
    .expect("write config");
    let err = cluster.fails(&["agent", "--config", conf2.to_str().expect("path")], 2);
    assert!(err.contains("invalid cron"), "{err}");
    assert!(cluster.nodes().is_empty());
    assert!(cluster.tasks().is_empty(), "bad input wrote something");

    // Conflicts: exit 3, nothing changed.
    cluster.ok(&["add", "t1", EVERY_SECOND, "--payload", "first"]);
    let err = cluster.fails(&["add", "t1", "*/5 * * * * *", "--payload", "second"], 3);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(cluster.tasks()["t1"]["payload"], "first");
    cluster.ok(&["delete", "t1"]);
    let err = cluster.fails(&["add", "t1", EVERY_SECOND], 3);
    assert!(err.contains("dcron reuse t1"), "{err}");
    assert_eq!(cluster.tasks()["t1"]["deleted"], true);
    cluster.ok(&[
        "add",
        "t1",
        "*/5 * * * * *",
        "--payload",
        "forced",
        "--force",
    ]);
    let t1 = &cluster.tasks()["t1"];
    assert_eq!(t1["deleted"], false);
    assert_eq!(t1["payload"], "forced");
    assert_eq!(t1["cron"], "*/5 * * * * *");
    cluster.ok(&["cleanup", "t1"]);
    assert!(cluster.tasks().is_empty());
}

/// A payload is data: handed over verbatim in DCRON_TASK_PAYLOAD and on
/// stdin, never run as shell code. A one-shot task runs once, ever.
fn payload_and_one_shot(registry: &str, name: &str) {
    let cluster = Cluster::new(registry, name);
    let dir = Scratch::new(name);
    let marker = dir.path("pwned");
    let out = dir.path("out");
    let payload = format!(
        "$(touch {m}) `touch {m}`; touch {m} && echo \"quoted' *\n\\x00 ${{HOME}}",
        m = marker.display()
    );
    let config = format!(
        r#"node_ttl = "2s"
heartbeat = "300ms"
reload_interval = "1s"
env = {{ OUT = "{out}" }}

[handler]
command = ["/bin/sh", "-c", "printf '%s' \"${{DCRON_TASK_PAYLOAD-unset}}\" > \"$OUT.$DCRON_TASK_NAME.env\"; cat > \"$OUT.$DCRON_TASK_NAME.stdin\"; [ \"$DCRON_TASK_NAME\" = once ] || exit 0; printf '%s %s\n' \"$(pwd)\" \"$HANDLER_VAR\" > \"$OUT.cwd\"; printf '%s %s %s\n' \"$DCRON_TASK_NAME\" \"$DCRON_FIRE_TIME\" \"$DCRON_FIRE_TIME_RFC3339\" >> \"$OUT\""]
working_dir = "{cwd}"
env = {{ HANDLER_VAR = "from-handler-env" }}
"#,
        out = out.display(),
        cwd = dir.0.display()
    );
    let _a = cluster.agent(&dir, "p1", &config);
    let _b = cluster.agent(&dir, "p2", &config);
    assert!(wait_until(Duration::from_secs(30), || cluster
        .working()
        .len()
        == 2));
    let pfile = dir.path("payload");
    std::fs::write(&pfile, &payload).expect("write payload");
    cluster.ok(&[
        "add",
        "once",
        EVERY_SECOND,
        "--one-shot",
        "--payload-file",
        pfile.to_str().expect("path"),
    ]);
    assert!(
        wait_until(Duration::from_secs(15), || out.exists()),
        "the one-shot task did not run"
    );
    std::thread::sleep(Duration::from_secs(3));
    let env_copy = std::fs::read_to_string(dir.path("out.once.env")).expect("payload from env");
    let stdin_copy =
        std::fs::read_to_string(dir.path("out.once.stdin")).expect("payload from stdin");
    assert_eq!(env_copy, payload);
    assert_eq!(stdin_copy, payload);
    assert!(!marker.exists(), "the payload was executed");
    let cwd = std::fs::read_to_string(dir.path("out.cwd")).expect("cwd");
    let real = std::fs::canonicalize(&dir.0).expect("canonical dir");
    assert_eq!(
        cwd.trim_end(),
        format!("{} from-handler-env", real.display()),
        "working_dir and env of the handler"
    );
    let lines = std::fs::read_to_string(&out).expect("runs");
    let runs: Vec<&str> = lines.lines().collect();
    assert_eq!(runs.len(), 1, "one-shot ran more than once: {runs:?}");
    let fields: Vec<&str> = runs[0].split(' ').collect();
    assert_eq!(fields[0], "once");
    let fire: i64 = fields[1].parse().expect("epoch ms");
    assert_eq!(fire % 1000, 0, "fire time is the scheduled second");
    let rfc = chrono::DateTime::parse_from_rfc3339(fields[2]).expect("RFC 3339");
    assert_eq!(rfc.timestamp_millis(), fire);
    let task = &cluster.tasks()["once"];
    assert_eq!(task["one_shot"], true);
    assert_eq!(task["deleted"], true);
    assert_eq!(task["last_run"]["fire_time"], fire);

    // A NUL byte cannot travel in an environment variable: on stdin only.
    let with_nul = "before\0after";
    std::fs::write(&pfile, with_nul).expect("write payload");
    cluster.ok(&[
        "add",
        "nul",
        EVERY_SECOND,
        "--one-shot",
        "--payload-file",
        pfile.to_str().expect("path"),
    ]);
    let stdin_file = dir.path("out.nul.stdin");
    assert!(
        wait_until(Duration::from_secs(15), || std::fs::read(&stdin_file)
            .is_ok_and(|b| b.len() == with_nul.len())),
        "the task with a NUL byte in its payload did not get it on stdin"
    );
    assert_eq!(
        std::fs::read(&stdin_file).expect("stdin"),
        with_nul.as_bytes()
    );
    let env_copy = std::fs::read_to_string(dir.path("out.nul.env")).expect("env");
    assert_eq!(env_copy, "unset", "DCRON_TASK_PAYLOAD is left out");
}

/// `dcron watch --output json` streams task and node changes.
fn watch_events(registry: &str, name: &str) {
    let cluster = Cluster::new(registry, name);
    let dir = Scratch::new(name);
    let mut child = cluster
        .command()
        .args(["watch", "--output", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dcron watch");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    // Let the watch subscribe before changing anything.
    std::thread::sleep(Duration::from_secs(2));
    let mut seen: Vec<Value> = Vec::new();
    let mut expect = |event: &str, key: &str, id: &str| {
        let found = |v: &Value| {
            v["event"] == event && v[key]["name"].as_str().or(v[key]["id"].as_str()) == Some(id)
        };
        if seen.iter().any(found) {
            return;
        }
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < end {
            if let Ok(v) = rx.recv_timeout(Duration::from_millis(200)) {
                let hit = found(&v);
                seen.push(v);
                if hit {
                    return;
                }
            }
        }
        panic!("no {event} event for {id}; saw {seen:?}");
    };
    cluster.ok(&["add", "w1", "0 0 * * * *", "--payload", "x"]);
    expect("task_put", "task", "w1");
    cluster.ok(&["delete", "w1"]);
    expect("task_marked_deleted", "task", "w1");
    cluster.ok(&["reuse", "w1"]);
    expect("task_revived", "task", "w1");
    cluster.ok(&["cleanup", "w1"]);
    expect("task_removed", "task", "w1");
    let fires = dir.path("fires");
    let agent = cluster.agent(&dir, "w-node", &agent_config(&fires, ""));
    expect("node_join", "node", "w-node");
    agent.signal(libc::SIGTERM);
    expect("node_leave", "node", "w-node");
    // SAFETY: plain kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().expect("watch exits");
    assert!(status.success(), "watch exited with {status}");
}

/// A run over its timeout is killed with its whole process group; a
/// second signal forces a draining agent out, killing its runs.
fn timeouts_and_forced_exit(registry: &str, name: &str) {
    let cluster = Cluster::new(registry, name);
    let dir = Scratch::new(name);
    let pids = dir.path("pids");
    let config = format!(
        r#"node_ttl = "2s"
heartbeat = "300ms"
drain_timeout = "60s"
catch_up = "off"
env = {{ PIDS = "{pids}" }}

[[task]]
name = "too-slow"
cron = "*/2 * * * * *"
command = "sleep 300 & echo \"$DCRON_TASK_NAME $!\" >> \"$PIDS\"; wait"
timeout = "1s"

[[task]]
name = "long"
cron = "{EVERY_SECOND}"
one_shot = true
command = "sleep 301 & echo \"$DCRON_TASK_NAME $!\" >> \"$PIDS\"; wait"
"#,
        pids = pids.display()
    );
    let mut agent = cluster.agent(&dir, "t1", &config);
    let read = || -> Vec<(String, i32)> {
        std::fs::read_to_string(&pids)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (t, p) = l.split_once(' ')?;
                Some((t.to_string(), p.trim().parse().ok()?))
            })
            .collect()
    };
    let alive = |pid: i32| -> bool {
        // A zombie (reparented, not reaped yet) counts as dead.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(") ").next().map(|r| !r.starts_with('Z')))
            .unwrap_or(false)
    };
    assert!(
        wait_until(Duration::from_secs(30), || {
            read().iter().any(|(t, _)| t == "too-slow") && read().iter().any(|(t, _)| t == "long")
        }),
        "tasks did not start: {}",
        agent.log_text()
    );
    let slow_pid = read()
        .into_iter()
        .find(|(t, _)| t == "too-slow")
        .map(|(_, p)| p)
        .expect("pid");
    assert!(
        wait_until(Duration::from_secs(10), || !alive(slow_pid)),
        "the timed-out run's background process survived"
    );
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .log_text()
            .contains("timed out after 1s")),
        "{}",
        agent.log_text()
    );
    let long_pid = read()
        .into_iter()
        .find(|(t, _)| t == "long")
        .map(|(_, p)| p)
        .expect("pid");
    assert!(alive(long_pid));
    agent.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.running(), "the agent should be draining the long run");
    assert!(alive(long_pid));
    agent.signal(libc::SIGINT);
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("forced exit");
    assert_eq!(status.code(), Some(130), "forced exit code");
    assert!(
        wait_until(Duration::from_secs(5), || !alive(long_pid)),
        "a forced exit left the run's process behind"
    );
}

// ----- Redis: everything --------------------------------------------------

#[test]
fn redis_agents_fire_once_and_take_over() {
    let Some(url) = redis_url() else { return };
    takeover(&url, "redis-takeover");
}

#[test]
fn redis_delete_stops_and_reuse_resumes() {
    let Some(url) = redis_url() else { return };
    steady_state(&url, "redis-steady");
}

#[test]
fn redis_invalid_input_exits_nonzero_and_writes_nothing() {
    let Some(url) = redis_url() else { return };
    invalid_input(&url, "redis-invalid");
}

#[test]
fn redis_payload_is_data_and_one_shot_runs_once() {
    let Some(url) = redis_url() else { return };
    payload_and_one_shot(&url, "redis-payload");
}

#[test]
fn redis_watch_streams_events() {
    let Some(url) = redis_url() else { return };
    watch_events(&url, "redis-watch");
}

#[test]
fn redis_timeouts_and_forced_exit_kill_runs() {
    let Some(url) = redis_url() else { return };
    timeouts_and_forced_exit(&url, "redis-timeouts");
}

// ----- the other backends -------------------------------------------------

#[test]
fn etcd_agents_fire_once_and_take_over() {
    let Some(url) = etcd_url() else { return };
    takeover(&url, "etcd-takeover");
}

#[test]
fn etcd_invalid_input_exits_nonzero_and_writes_nothing() {
    let Some(url) = etcd_url() else { return };
    invalid_input(&url, "etcd-invalid");
}

#[test]
fn zookeeper_agents_fire_once_and_take_over() {
    let Some(url) = zk_url() else { return };
    takeover(&url, "zk-takeover");
}

#[test]
fn consul_delete_stops_and_reuse_resumes() {
    let Some(url) = consul_url() else { return };
    steady_state(&url, "consul-steady");
}

#[test]
fn consul_watch_streams_events() {
    let Some(url) = consul_url() else { return };
    watch_events(&url, "consul-watch");
}

// ----- no server needed ---------------------------------------------------

#[test]
fn agent_check_validates_the_config_offline() {
    let dir = Scratch::new("check");
    let conf = dir.path("ok.toml");
    std::fs::write(&conf, agent_config(&dir.path("fires"), "")).expect("write config");
    let cluster = Cluster::new("redis://127.0.0.1:1", "check");
    let out = cluster.ok(&["agent", "--config", conf.to_str().expect("path"), "--check"]);
    assert!(out.contains("configuration OK"), "{out}");
    // Programs and directories missing on this host are warned about.
    let odd = dir.path("odd.toml");
    std::fs::write(
        &odd,
        "[[task]]\nname = \"t\"\ncron = \"* * * * *\"\ncommand = [\"/nonexistent/prog\"]\nworking_dir = \"/nonexistent/dir\"\n\n[[task]]\nname = \"u\"\ncron = \"* * * * *\"\ncommand = [\"no-such-program-anywhere\"]\n",
    )
    .expect("write config");
    let checked = std::process::Command::new(BIN)
        .args(["agent", "--config", odd.to_str().expect("path"), "--check"])
        .output()
        .expect("run dcron");
    assert_eq!(checked.status.code(), Some(0));
    let warnings = String::from_utf8_lossy(&checked.stderr);
    for want in [
        "task `t`: working_dir `/nonexistent/dir` is not a directory",
        "task `t`: program `/nonexistent/prog` is not found",
        "task `u`: program `no-such-program-anywhere` is not found",
    ] {
        assert!(warnings.contains(want), "{want}: {warnings}");
    }
    let err = cluster.fails(&["agent", "--config", "/nonexistent/dcron.toml"], 2);
    assert!(err.contains("cannot read config file"), "{err}");
    let out = std::process::Command::new(BIN)
        .args(["tasks"])
        .env_remove("DCRON_REGISTRY")
        .output()
        .expect("run dcron");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no registry"));
    // Nothing listens on port 1: a registry failure is exit code 1.
    let err = cluster.fails(&["tasks"], 1);
    assert!(
        err.contains("cannot connect to redis://127.0.0.1:1"),
        "{err}"
    );
    let mut tls = Cluster::new("rediss://127.0.0.1:1", "check");
    if cfg!(feature = "tls") {
        tls.fails(&["tasks"], 1);
    } else {
        let err = tls.fails(&["tasks"], 2);
        assert!(err.contains("`tls` feature"), "{err}");
    }
    tls.registry = "consul+https://127.0.0.1:1".into();
    if !cfg!(feature = "tls") {
        tls.fails(&["tasks"], 2);
    }
}

/// The minimal configuration shipped in `examples/agent.toml` passes
/// `--check` and runs: two agents, one hello per fire in the cluster, and a
/// dynamic task through the handler.
#[test]
fn the_shipped_example_config_runs() {
    let Some(url) = redis_url() else { return };
    let config = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/agent.toml"
    ))
    .expect("examples/agent.toml");
    let cluster = Cluster::new(&url, "example-config");
    let dir = Scratch::new("example-config");
    let checked = std::process::Command::new(BIN)
        .args(["agent", "--check", "--config"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/agent.toml"
        ))
        .output()
        .expect("run dcron");
    assert_eq!(checked.status.code(), Some(0));
    assert!(
        checked.stderr.is_empty(),
        "warnings: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let a = cluster.agent(&dir, "ex1", &config);
    let b = cluster.agent(&dir, "ex2", &config);
    cluster.ok(&["add", "greet", "* * * * * *", "--payload", "hi"]);
    let logs = || {
        [&a, &b]
            .iter()
            .map(|agent| std::fs::read_to_string(&agent.log).unwrap_or_default())
            .collect::<String>()
    };
    assert!(
        wait_until(Duration::from_secs(30), || {
            let all = logs();
            all.matches("says hello").count() >= 2 && all.contains("runs greet with payload hi")
        }),
        "the example config did not run: {}",
        logs()
    );
    // One hello per fire time in the whole cluster.
    let all = logs();
    let hellos: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("says hello"))
        .filter_map(|l| l.split("fire_time=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert!(hellos.len() >= 2, "hello runs without a fire time: {all}");
    let unique: std::collections::BTreeSet<&str> = hellos.iter().copied().collect();
    assert_eq!(hellos.len(), unique.len(), "a hello ran twice: {all}");
}

/// A task definition with a cron that does not parse (written by another
/// program) is listed as invalid, with no owner: it can never run.
#[test]
fn foreign_task_with_an_invalid_cron_has_no_owner() {
    let Some(url) = redis_url() else { return };
    let cluster = Cluster::new(&url, "foreign-cron");
    let dir = Scratch::new("foreign-cron");
    let _agent = cluster.agent(&dir, "f1", &agent_config(&dir.path("fires"), ""));
    assert!(wait_until(Duration::from_secs(30), || cluster
        .working()
        .len()
        == 1));
    let host_port = url.trim_start_matches("redis://");
    let (host, port) = host_port.split_once(':').expect("host:port");
    let port = port.split('/').next().expect("port");
    let meta = r#"{"name":"broken","cron_format":"0 99 * * *","payload":""}"#;
    let set = std::process::Command::new("redis-cli")
        .args(["-h", host, "-p", port, "HSET"])
        .arg(format!("{{{}}}:tasks", cluster.ns))
        .args(["broken", meta])
        .output()
        .expect("run redis-cli");
    assert!(set.status.success(), "{set:?}");
    let tasks = cluster.tasks();
    let broken = &tasks["broken"];
    assert!(broken["owner"].is_null(), "{broken}");
    assert!(
        broken["invalid"]
            .as_str()
            .is_some_and(|r| r.contains("hour field `99`")),
        "{broken}"
    );
    let table = cluster.ok(&["tasks"]);
    assert!(table.contains("invalid cron"), "{table}");
}

/// A secret planted in every place a registry credential can be given (the
/// URL of each backend, each secret variable) never appears in what the
/// command prints, whatever fails: a refused URL, an unreachable server.
#[test]
fn planted_secrets_are_never_echoed() {
    const SECRET: &str = "pl4nted-s3cret-0042";
    // Nothing listens on port 1: every connection is refused.
    let urls = [
        format!("redis://:{SECRET}@127.0.0.1:1/0"),
        format!("redis://user:{SECRET}@127.0.0.1:1"),
        format!("rediss://:{SECRET}@127.0.0.1:1"),
        format!("redis://:{SECRET}@127.0.0.1:1/not-a-db"),
        format!("etcd://root:{SECRET}@127.0.0.1:1"),
        format!("zk://root:{SECRET}@127.0.0.1:1"),
        format!("consul://{SECRET}@127.0.0.1:1"),
        format!("consul://127.0.0.1:1?token={SECRET}"),
        format!("consul://127.0.0.1:1?dc=a&{SECRET}"),
    ];
    let env_forms = [
        ("redis://127.0.0.1:1", "DCRON_REDIS_PASSWORD"),
        ("etcd://root@127.0.0.1:1", "DCRON_ETCD_PASSWORD"),
        ("etcd://127.0.0.1:1", "DCRON_ETCD_PASSWORD"),
        ("zk://root@127.0.0.1:1", "DCRON_ZK_PASSWORD"),
        ("consul://127.0.0.1:1", "DCRON_CONSUL_TOKEN"),
    ];
    let run = |url: &str, env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["--timeout", "3s", "--registry", url, "tasks"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run dcron");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{url}: {all}");
        assert!(!all.contains(SECRET), "secret echoed for {url}: {all}");
    };
    for url in &urls {
        run(url, &[]);
    }
    for (url, var) in env_forms {
        run(url, &[(var, SECRET)]);
    }
}

/// Registry passwords come from the environment, are never printed, and
/// never reach the commands an agent runs.
#[test]
fn redis_password_from_env_is_used_never_printed_nor_passed_on() {
    if redis_url().is_none() {
        return;
    }
    const SECRET: &str = "s3cr3t-pw-7781";
    // Our slice of the test port range; the first free one.
    let port = (17893..=17899)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in 17893-17899")
        .to_string();
    let port = port.as_str();
    let dir = Scratch::new("redis-auth");
    let _server = Server::start(&["redis", port, dir.path("srv").to_str().expect("path")]);
    let set = std::process::Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "CONFIG",
            "SET",
            "requirepass",
            SECRET,
        ])
        .output()
        .expect("run redis-cli");
    assert!(set.status.success(), "{set:?}");
    let cluster = Cluster::new(&format!("redis://127.0.0.1:{port}"), "redis-auth");

    let err = cluster.fails(&["tasks"], 1);
    assert!(err.contains("cannot connect"), "{err}");
    let wrong = cluster
        .command()
        .args(["tasks"])
        .env("DCRON_REDIS_PASSWORD", "wr0ng-pw-1234")
        .output()
        .expect("run dcron");
    assert_eq!(wrong.status.code(), Some(1));
    let text = String::from_utf8_lossy(&wrong.stderr);
    assert!(!text.contains("wr0ng-pw-1234"), "password echoed: {text}");

    let with_secret = |args: &[&str]| {
        let out = cluster
            .command()
            .args(args)
            .env("DCRON_REDIS_PASSWORD", SECRET)
            .output()
            .expect("run dcron");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "dcron {args:?}: {all}");
        assert!(!all.contains(SECRET), "password echoed: {all}");
        all
    };
    with_secret(&["add", "env-dump", EVERY_SECOND, "--one-shot"]);
    assert!(with_secret(&["tasks"]).contains("env-dump"));

    // A password in the URL is accepted, and redacted in messages.
    let mut in_url = Cluster::new(
        &format!("redis://:{SECRET}@127.0.0.1:{port}/x"),
        "redis-auth",
    );
    let err = in_url.fails(&["tasks"], 2);
    assert!(!err.contains(SECRET) && err.contains("***"), "{err}");
    in_url.registry = format!("redis://:{SECRET}@127.0.0.1:{port}");
    in_url.ns = cluster.ns.clone();
    assert!(in_url.ok(&["tasks"]).contains("env-dump"));

    // The agent's commands do not see the registry's secrets.
    let dump = dir.path("env");
    let config = format!(
        "node_ttl = \"2s\"\nheartbeat = \"300ms\"\n[handler]\ncommand = [\"/bin/sh\", \"-c\", \"env > {}\"]\n",
        dump.display()
    );
    let conf = dir.path("agent.toml");
    std::fs::write(&conf, config).expect("write config");
    let log = dir.path("agent.log");
    let log_file = std::fs::File::create(&log).expect("log");
    let mut agent = cluster
        .command()
        .args(["agent", "--config", conf.to_str().expect("path")])
        .env("DCRON_REDIS_PASSWORD", SECRET)
        .env("CONSUL_HTTP_TOKEN", SECRET)
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .spawn()
        .expect("spawn agent");
    let ran = wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&dump).is_ok_and(|t| t.contains("DCRON_TASK_NAME=env-dump"))
    });
    let _ = agent.kill();
    let _ = agent.wait();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(ran, "the handler did not run: {log_text}");
    let env = std::fs::read_to_string(&dump).expect("env dump");
    assert!(!env.contains(SECRET), "a secret reached the handler: {env}");
    assert!(!log_text.contains(SECRET), "a secret reached the log");
    assert!(env.contains("DCRON_NODE_ID="), "{env}");
}
