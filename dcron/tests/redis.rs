//! The Redis registry against the conformance suite and the cluster tests,
//! plus Redis-specific and fault tests; those that restart a server start
//! their own throw-away `redis-server` (ports 31200-31299).
#![cfg(feature = "redis")]

mod cluster;
mod conformance;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use dcron::registry::{Claim, RawKind, RedisRegistry, Registry, WatchEvent, WatchReceiver};
use dcron::{Dcron, Error, NodeStatus, Strategy, TaskContext, TaskMeta};
use tokio::time::Instant;

use cluster::{now_ms, Ledger};
use conformance::{eventually, expect_event, fresh_ns};

/// Reaches the shared server named by `DCRON_REDIS_URL`.
struct Redis {
    url: String,
}

impl Redis {
    /// `None` (test skipped) when the server is not configured.
    fn from_env() -> Option<Self> {
        support::service_env("DCRON_REDIS_URL").map(|url| Redis { url })
    }

    async fn connect(&self) -> RedisRegistry {
        RedisRegistry::connect(&self.url)
            .await
            .expect("connect to redis")
    }

    async fn raw(&self) -> redis::aio::MultiplexedConnection {
        raw_connection(&self.url).await
    }
}

async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

/// The server's clock, epoch ms.
async fn server_ms(con: &mut redis::aio::MultiplexedConnection) -> i64 {
    let (s, us): (i64, i64) = redis::cmd("TIME").query_async(con).await.expect("TIME");
    s * 1000 + us / 1000
}

impl conformance::Harness for Redis {
    async fn registry(&self) -> Arc<dyn Registry> {
        Arc::new(self.connect().await)
    }

    async fn write_raw(&self, ns: &str, kind: RawKind, name: &str, raw: &[u8]) {
        let mut con = self.raw().await;
        let hash = match kind {
            RawKind::Task => "tasks",
            RawKind::Tombstone => "deleted",
            RawKind::Claim => "claims",
            RawKind::Node => {
                // A foreign node entry alive for an hour of the server's clock.
                let expires = server_ms(&mut con).await + 3_600_000;
                let _: () = redis::pipe()
                    .cmd("SET")
                    .arg(format!("{{{ns}}}:node:{name}"))
                    .arg(raw)
                    .ignore()
                    .cmd("ZADD")
                    .arg(format!("{{{ns}}}:nodes"))
                    .arg(expires)
                    .arg(name)
                    .ignore()
                    .query_async(&mut con)
                    .await
                    .expect("raw node");
                return;
            }
        };
        let _: i64 = redis::cmd("HSET")
            .arg(format!("{{{ns}}}:{hash}"))
            .arg(name)
            .arg(raw)
            .query_async(&mut con)
            .await
            .expect("raw HSET");
    }

    fn short_ttl(&self) -> Duration {
        Duration::from_secs(2)
    }

    fn url_at(&self, host_port: &str) -> Option<String> {
        Some(format!("redis://{host_port}"))
    }
}

/// The shared-server harness, or `return` (skip) without one.
macro_rules! harness {
    () => {
        match Redis::from_env() {
            Some(harness) => harness,
            None => return,
        }
    };
}

conformance::suite!(harness!());
cluster::suite!(harness!());

fn claim(fire_time: i64, node: &str) -> Claim {
    Claim::new(fire_time, node, &format!("{node}/1"), fire_time + 1)
}

fn node(id: &str) -> dcron::Node {
    conformance::node(id, NodeStatus::Working)
}

async fn ids(r: &RedisRegistry, ns: &str) -> BTreeSet<String> {
    r.nodes(ns)
        .await
        .expect("nodes")
        .into_iter()
        .map(|n| n.id)
        .collect()
}

/// Collects the task names a feed reports until it has `want` of them; on
/// `Resync` it reads the full set, as a node would.
async fn collect_tasks(
    r: &RedisRegistry,
    ns: &str,
    rx: &mut WatchReceiver,
    want: usize,
    within: Duration,
) -> (BTreeSet<String>, usize) {
    let deadline = Instant::now() + within;
    let mut seen = BTreeSet::new();
    let mut resyncs = 0;
    while seen.len() < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(WatchEvent::TaskPut(meta))) => {
                seen.insert(meta.name);
            }
            Ok(Some(WatchEvent::Resync)) => {
                resyncs += 1;
                seen.extend(
                    r.tasks(ns)
                        .await
                        .expect("tasks")
                        .into_iter()
                        .map(|t| t.name),
                );
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("watch closed"),
            Err(_) => panic!("only {} of {want} tasks within {within:?}", seen.len()),
        }
    }
    (seen, resyncs)
}

// ---------------------------------------------------------------------------
// Construction.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_fails_fast_with_a_clear_error() {
    conformance::init_tracing();
    // Nothing listens on this port (in our range, never started).
    let started = Instant::now();
    let err = RedisRegistry::builder("redis://dcron:hunter2@127.0.0.1:31299/3")
        .connect_timeout(Duration::from_millis(500))
        .retries(2)
        .connect()
        .await
        .expect_err("nothing listens there");
    let took = started.elapsed();
    let text = format!("{err} / {err:?}");
    assert!(
        text.contains("127.0.0.1:31299"),
        "error names the address: {text}"
    );
    assert!(
        !text.contains("hunter2"),
        "error leaks the password: {text}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    eprintln!("unreachable server: {err} (after {took:?})");

    for url in [
        "http://127.0.0.1:6379",
        "redis://127.0.0.1:notaport",
        "not a url",
    ] {
        match RedisRegistry::connect(url).await {
            Err(Error::InvalidConfig(msg)) => assert!(!msg.contains("hunter2")),
            other => panic!("{url}: expected InvalidConfig, got {other:?}"),
        }
    }
    // rediss:// without one of redis's TLS features: a clear config error.
    match RedisRegistry::connect("rediss://:hunter2@127.0.0.1:31299").await {
        Err(Error::InvalidConfig(msg)) => {
            assert!(msg.contains("TLS"), "{msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
        Err(other) => {
            // Built with a TLS feature (feature unification): it still fails fast.
            assert!(!other.to_string().contains("hunter2"), "{other}");
        }
        Ok(_) => panic!("nothing listens on 31299"),
    }
    let debug = format!(
        "{:?}",
        RedisRegistry::builder("redis://:hunter2@127.0.0.1:31299")
    );
    assert!(!debug.contains("hunter2"), "{debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constructors_from_client_and_connection_manager() {
    conformance::init_tracing();
    let h = harness!();
    let client = redis::Client::open(h.url.as_str()).expect("url");
    let ns = fresh_ns("ctor");
    let a = RedisRegistry::builder(h.url.as_str())
        .client(client.clone())
        .connect()
        .await
        .expect("from client");
    let manager = redis::aio::ConnectionManager::new(client.clone())
        .await
        .expect("manager");
    let b = RedisRegistry::builder(h.url.as_str())
        .client(client)
        .connection_manager(manager)
        .connect()
        .await
        .expect("from connection manager");
    let mut rx = b.watch(&ns).await.expect("watch");
    let meta = TaskMeta::new("t", "* * * * *");
    a.put_task(&ns, &meta, false).await.expect("put");
    expect_event(&mut rx, Duration::from_secs(10), "TaskPut", |e| {
        *e == WatchEvent::TaskPut(meta.clone())
    })
    .await;
    assert_eq!(b.tasks(&ns).await.expect("tasks"), vec![meta]);
    assert_eq!(a.timing().node_ttl, Duration::from_secs(10));
    assert_eq!(a.timing().heartbeat, Duration::from_secs(2));
    assert_eq!(a.timing().reload, Duration::from_secs(10));
    a.clear(&ns).await.expect("clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_are_isolated_including_the_feed() {
    conformance::init_tracing();
    let h = harness!();
    let base = h.url.trim_end_matches('/');
    let db0 = RedisRegistry::connect(format!("{base}/0"))
        .await
        .expect("db 0");
    let db5 = RedisRegistry::connect(format!("{base}/5"))
        .await
        .expect("db 5");
    let ns = fresh_ns("db");
    let mut rx0 = db0.watch(&ns).await.expect("watch 0");
    db5.put_task(&ns, &TaskMeta::new("in-five", "* * * * *"), false)
        .await
        .expect("put 5");
    db5.register(&ns, &node("n5"), Duration::from_secs(30))
        .await
        .expect("register 5");
    db5.unregister(&ns, "n5").await.expect("unregister 5");
    assert!(db0.tasks(&ns).await.expect("tasks 0").is_empty());
    let marker = TaskMeta::new("in-zero", "* * * * *");
    db0.put_task(&ns, &marker, false).await.expect("put 0");
    let ev = expect_event(&mut rx0, Duration::from_secs(10), "an event", |_| true).await;
    assert_eq!(ev, WatchEvent::TaskPut(marker), "db 0 saw db 5's events");
    db0.clear(&ns).await.expect("clear");
    db5.clear(&ns).await.expect("clear");
}

// ---------------------------------------------------------------------------
// Liveness and the feed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_uses_the_server_clock_and_is_published_once() {
    conformance::init_tracing();
    let h = harness!();
    let ns = fresh_ns("expiry-once");
    let r = h.connect().await;
    let mut feeds = Vec::new();
    for _ in 0..3 {
        let w = h.connect().await;
        let rx = w.watch(&ns).await.expect("watch");
        feeds.push((w, rx));
    }
    let ttl = Duration::from_millis(1500);
    let mut con = h.raw().await;
    let before = server_ms(&mut con).await;
    r.register(&ns, &node("doomed"), ttl)
        .await
        .expect("register");
    let after = server_ms(&mut con).await;
    let score: f64 = redis::cmd("ZSCORE")
        .arg(format!("{{{ns}}}:nodes"))
        .arg("doomed")
        .query_async(&mut con)
        .await
        .expect("score");
    let score = score as i64;
    assert!(
        score >= before + 1500 && score <= after + 1500,
        "expiry {score} is not the server's TIME + ttl ({before}..{after} + 1500)"
    );
    let registered = Instant::now();
    // Every watcher sees exactly one NodeDelete, soon after the expiry.
    for (_, rx) in &mut feeds {
        expect_event(rx, Duration::from_secs(10), "NodeDelete", |e| {
            *e == WatchEvent::NodeDelete("doomed".into())
        })
        .await;
    }
    let took = registered.elapsed();
    eprintln!("TTL {ttl:?}: NodeDelete at every watcher {took:?} after the last heartbeat");
    assert!(
        took >= ttl - Duration::from_millis(100),
        "expired early: {took:?}"
    );
    let marker = TaskMeta::new("marker", "* * * * *");
    r.put_task(&ns, &marker, false).await.expect("marker");
    for (_, rx) in &mut feeds {
        let ev = expect_event(rx, Duration::from_secs(10), "next event", |e| {
            !matches!(e, WatchEvent::NodePut(_))
        })
        .await;
        assert_eq!(
            ev,
            WatchEvent::TaskPut(marker.clone()),
            "a second NodeDelete?"
        );
    }
    // The expired member and its record are gone from the server.
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("{{{ns}}}:node:doomed"))
        .query_async(&mut con)
        .await
        .expect("exists");
    assert_eq!(exists, 0);
    assert!(!r.heartbeat(&ns, "doomed", ttl).await.expect("heartbeat"));
    r.clear(&ns).await.expect("clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_skips_expired_members_without_a_watcher() {
    conformance::init_tracing();
    let h = harness!();
    let ns = fresh_ns("lazy-expiry");
    let r = h.connect().await;
    r.register(&ns, &node("short"), Duration::from_millis(300))
        .await
        .expect("register");
    r.register(&ns, &node("long"), Duration::from_secs(30))
        .await
        .expect("register");
    eventually(Duration::from_secs(5), "short to expire", || async {
        ids(&r, &ns).await == BTreeSet::from(["long".to_string()])
    })
    .await;
    let mut con = h.raw().await;
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{{{ns}}}:nodes"))
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await
        .expect("zrange");
    assert_eq!(
        members,
        vec!["long".to_string()],
        "nodes() cleans expired members"
    );
    // A member whose record vanished is not alive: heartbeat says so.
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{{{ns}}}:node:long"))
        .query_async(&mut con)
        .await
        .expect("del");
    assert!(ids(&r, &ns).await.is_empty());
    assert!(!r
        .heartbeat(&ns, "long", Duration::from_secs(30))
        .await
        .expect("heartbeat"));
    assert!(!r.update_node(&ns, &node("long")).await.expect("update"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_and_corrupt_values_are_skipped_by_the_feed() {
    conformance::init_tracing();
    let h = harness!();
    let ns = fresh_ns("foreign");
    let r = h.connect().await;
    let mut rx = r.watch(&ns).await.expect("watch");
    let mut con = h.raw().await;
    h.write_raw_task(&ns, "broken", b"\xff not json").await;
    let channel = format!("{{{ns}}}:events");
    for msg in [
        &b"task-put broken"[..],
        b"task-put absent",
        b"node-put ghost",
        b"hello world",
        b"\xff\xfe",
        b"task-delete bad/name",
    ] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(msg)
            .query_async(&mut con)
            .await
            .expect("publish");
    }
    let good = TaskMeta::new("good", "* * * * *");
    r.put_task(&ns, &good, false).await.expect("put");
    let ev = expect_event(&mut rx, Duration::from_secs(10), "an event", |_| true).await;
    assert_eq!(ev, WatchEvent::TaskPut(good));
    // A foreign `resync` is honoured.
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg("resync")
        .query_async(&mut con)
        .await
        .expect("publish");
    expect_event(&mut rx, Duration::from_secs(10), "Resync", |e| {
        *e == WatchEvent::Resync
    })
    .await;
    r.clear(&ns).await.expect("clear");
}

impl Redis {
    async fn write_raw_task(&self, ns: &str, name: &str, raw: &[u8]) {
        conformance::Harness::write_raw(self, ns, RawKind::Task, name, raw).await;
    }
}

async fn numsub(con: &mut redis::aio::MultiplexedConnection, channel: &str) -> i64 {
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(con)
        .await
        .expect("numsub");
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_when_the_receiver_is_dropped() {
    conformance::init_tracing();
    let h = harness!();
    let ns = fresh_ns("drop-watch");
    let r = h.connect().await;
    let channel = format!("{{{ns}}}:events");
    let mut con = h.raw().await;
    let rx = r.watch(&ns).await.expect("watch");
    assert_eq!(numsub(&mut con, &channel).await, 1);
    drop(rx);
    // An idle feed notices too: its connection goes away.
    eventually(
        Duration::from_secs(5),
        "the feed's connection to close",
        || {
            let (mut con, channel) = (con.clone(), channel.clone());
            async move { numsub(&mut con, &channel).await == 0 }
        },
    )
    .await;
    for i in 0..10 {
        r.put_task(&ns, &TaskMeta::new(format!("t{i}"), "* * * * *"), false)
            .await
            .expect("put");
    }
    r.clear(&ns).await.expect("clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_feed_stays_subscribed_without_resyncs() {
    conformance::init_tracing();
    let h = harness!();
    let ns = fresh_ns("idle");
    let r = h.connect().await;
    let mut rx = r.watch(&ns).await.expect("watch");
    // Longer than two keep-alive pings of the feed (every 5 s).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let meta = TaskMeta::new("wake-up", "* * * * *");
    r.put_task(&ns, &meta, false).await.expect("put");
    let ev = expect_event(&mut rx, Duration::from_secs(10), "an event", |_| true).await;
    assert_eq!(
        ev,
        WatchEvent::TaskPut(meta),
        "an idle feed must not reconnect"
    );
    r.clear(&ns).await.expect("clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_reach_every_watcher() {
    conformance::init_tracing();
    let h = harness!();
    const N: usize = 10_000;
    let ns = fresh_ns("ten-thousand");
    let mut feeds = Vec::new();
    for _ in 0..3 {
        let w = h.connect().await;
        let rx = w.watch(&ns).await.expect("watch");
        feeds.push((w, rx));
    }
    let writer = h.connect().await;
    let started = Instant::now();
    let mut joins = Vec::new();
    for chunk in 0..10 {
        let (w, ns) = (writer.clone(), ns.clone());
        joins.push(tokio::spawn(async move {
            for i in (chunk * N / 10)..((chunk + 1) * N / 10) {
                let meta = TaskMeta::new(format!("task-{i:05}"), "0 0 0 1 1 *")
                    .with_payload(format!("payload {i}"));
                w.put_task(&ns, &meta, false).await.expect("put");
            }
        }));
    }
    for j in joins {
        j.await.expect("writer");
    }
    let written = started.elapsed();
    let all = writer.tasks(&ns).await.expect("tasks");
    assert_eq!(all.len(), N, "HSCAN must return every task exactly once");
    assert!(all.iter().all(|t| t.payload.starts_with("payload ")));
    for (w, rx) in &mut feeds {
        let (seen, resyncs) = collect_tasks(w, &ns, rx, N, Duration::from_secs(60)).await;
        assert_eq!(seen.len(), N);
        eprintln!("watcher: {N} tasks ({resyncs} resyncs)");
    }
    eprintln!(
        "{N} tasks written in {written:?}, every watcher had them after {:?}",
        started.elapsed()
    );
    writer.clear(&ns).await.expect("clear");
    assert!(writer.tasks(&ns).await.expect("tasks").is_empty());
}

// ---------------------------------------------------------------------------
// Fault tests on throw-away servers (ports 31200-31299).

/// A throw-away `redis-server` on `port`, restartable on the same port with
/// empty data (no persistence).
struct Throwaway {
    port: u16,
    dir: support::ScratchDir,
    server: Option<support::Server>,
    starts: usize,
}

impl Throwaway {
    fn start(name: &str, port: u16) -> Self {
        let dir = support::ScratchDir::new(name);
        let mut t = Throwaway {
            port,
            dir,
            server: None,
            starts: 0,
        };
        t.restart();
        t
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        self.starts += 1;
        let dir = format!("{}/run{}", self.dir.path(), self.starts);
        std::fs::create_dir_all(&dir).expect("dir");
        self.server = Some(support::Server::start(&[
            "redis",
            &self.port.to_string(),
            &dir,
        ]));
    }

    /// SIGKILL: the data is gone, as with a crash of a server without
    /// persistence.
    fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            for pid in &server.pids {
                server.kill_pid(pid);
            }
        }
    }

    async fn registry(&self) -> RedisRegistry {
        RedisRegistry::builder(self.url())
            .connect_timeout(Duration::from_millis(500))
            .request_timeout(Duration::from_secs(2))
            .retries(1)
            .connect()
            .await
            .expect("connect to the throw-away server")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_errors_then_recovers() {
    conformance::init_tracing();
    if support::service_env("DCRON_REDIS_URL").is_none() {
        return;
    }
    let mut server = Throwaway::start("redis-restart", 31210);
    let ns = fresh_ns("restart");
    let r = server.registry().await;
    let watcher = server.registry().await;
    let mut rx = watcher.watch(&ns).await.expect("watch");
    let ttl = Duration::from_secs(30);
    r.register(&ns, &node("survivor"), ttl)
        .await
        .expect("register");
    let before = TaskMeta::new("before", "* * * * *");
    r.put_task(&ns, &before, false).await.expect("put");
    expect_event(&mut rx, Duration::from_secs(10), "TaskPut before", |e| {
        *e == WatchEvent::TaskPut(before.clone())
    })
    .await;
    assert!(r
        .claim(&ns, "before", &claim(1_000, "survivor"))
        .await
        .expect("claim"));

    server.kill();
    // While it is down: every call fails, within a bound, never hangs.
    let bound = Duration::from_secs(6);
    for round in 0..3 {
        let t = Instant::now();
        assert!(r.nodes(&ns).await.is_err(), "nodes while down");
        assert!(
            r.heartbeat(&ns, "survivor", ttl).await.is_err(),
            "heartbeat while down"
        );
        assert!(
            r.claim(&ns, "before", &claim(2_000, "survivor"))
                .await
                .is_err(),
            "claim while down"
        );
        assert!(r.tasks(&ns).await.is_err(), "tasks while down");
        let took = t.elapsed();
        eprintln!("round {round} of four calls while down: {took:?}");
        assert!(took < bound * 4, "calls while down took {took:?}");
    }
    let err = r.nodes(&ns).await.expect_err("down");
    assert!(err.to_string().contains("127.0.0.1:31210"), "{err}");

    server.restart();
    let restarted = Instant::now();
    // The manager reconnects: calls work again, on an empty server.
    eventually(Duration::from_secs(20), "calls to work again", || async {
        r.nodes(&ns).await.is_ok()
    })
    .await;
    let reconnected = restarted.elapsed();
    assert!(
        !r.heartbeat(&ns, "survivor", ttl).await.expect("heartbeat"),
        "the registration is gone with the data: heartbeat must say so"
    );
    assert!(r.tasks(&ns).await.expect("tasks").is_empty());
    r.register(&ns, &node("survivor"), ttl)
        .await
        .expect("register again");
    assert!(r.heartbeat(&ns, "survivor", ttl).await.expect("heartbeat"));
    assert!(r
        .claim(&ns, "before", &claim(2_000, "survivor"))
        .await
        .expect("claim after"));
    // The feed came back by itself and said events may have been lost.
    expect_event(
        &mut rx,
        Duration::from_secs(20),
        "Resync after the restart",
        |e| *e == WatchEvent::Resync,
    )
    .await;
    let resynced = restarted.elapsed();
    let after = TaskMeta::new("after", "* * * * *");
    r.put_task(&ns, &after, false).await.expect("put after");
    expect_event(&mut rx, Duration::from_secs(10), "TaskPut after", |e| {
        *e == WatchEvent::TaskPut(after.clone())
    })
    .await;
    eprintln!("redis restart: calls work {reconnected:?} and the feed resynced {resynced:?} after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_a_long_outage() {
    conformance::init_tracing();
    if support::service_env("DCRON_REDIS_URL").is_none() {
        return;
    }
    let mut server = Throwaway::start("redis-outage", 31220);
    let ns = fresh_ns("outage");
    let r = server.registry().await;
    let mut rx = r.watch(&ns).await.expect("watch");
    server.kill();
    // Down for longer than the feed's backoff cap: it keeps trying, capped.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(rx.try_recv().is_err(), "no event while the server is down");
    server.restart();
    expect_event(&mut rx, Duration::from_secs(20), "Resync", |e| {
        *e == WatchEvent::Resync
    })
    .await;
    let meta = TaskMeta::new("back", "* * * * *");
    eventually(Duration::from_secs(10), "writes to work again", || async {
        r.put_task(&ns, &meta, true).await.is_ok()
    })
    .await;
    expect_event(&mut rx, Duration::from_secs(10), "TaskPut", |e| {
        *e == WatchEvent::TaskPut(meta.clone())
    })
    .await;
}

// ---------------------------------------------------------------------------
// Node-level tests (dcron::Dcron on Redis).

fn recording_node(registry: &RedisRegistry, ns: &str, id: &str, ledger: &Ledger) -> Dcron {
    let (recorder, me) = (ledger.clone(), id.to_string());
    Dcron::builder(registry.clone())
        .namespace(ns)
        .node_id(id)
        .strategy(Strategy::Consistent)
        .node_ttl(Duration::from_secs(2))
        .heartbeat(Duration::from_millis(500))
        .reload_interval(Duration::from_secs(2))
        .task_handler(move |ctx: TaskContext| {
            let (recorder, me) = (recorder.clone(), me.clone());
            async move {
                recorder.record(&ctx, &me);
                Ok(())
            }
        })
        .build()
        .expect("node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_dynamic_tasks_reach_every_node() {
    conformance::init_tracing();
    let h = harness!();
    const N: usize = 10_000;
    let ns = fresh_ns("node-10k");
    let ledger = Ledger::default();
    let mut nodes = Vec::new();
    for id in ["node-a", "node-b", "node-c"] {
        let n = recording_node(&h.connect().await, &ns, id, &ledger);
        n.start().await.expect("start");
        nodes.push(n);
    }
    let started = Instant::now();
    let mut joins = Vec::new();
    for chunk in 0..10 {
        let (n, ns) = (nodes[chunk % 3].clone(), ns.clone());
        joins.push(tokio::spawn(async move {
            let _ = ns;
            for i in (chunk * N / 10)..((chunk + 1) * N / 10) {
                // Never fires during the test (midnight on January 1st).
                n.add_task_meta(TaskMeta::new(format!("dyn-{i:05}"), "0 0 0 1 1 *"))
                    .await
                    .expect("add");
            }
        }));
    }
    for j in joins {
        j.await.expect("adder");
    }
    let added = started.elapsed();
    for n in &nodes {
        let n = n.clone();
        eventually(
            Duration::from_secs(60),
            "every node to know all tasks",
            || {
                let n = n.clone();
                async move { n.all_tasks().len() == N }
            },
        )
        .await;
    }
    eventually(
        Duration::from_secs(30),
        "ownership to partition the tasks",
        || async {
            let owned: Vec<String> = nodes.iter().flat_map(|n| n.owned_tasks()).collect();
            let distinct: BTreeSet<&String> = owned.iter().collect();
            owned.len() == N && distinct.len() == N
        },
    )
    .await;
    eprintln!(
        "{N} dynamic tasks added in {added:?}; every node knew them and owned its share after {:?} ({:?})",
        started.elapsed(),
        nodes.iter().map(|n| n.owned_tasks().len()).collect::<Vec<_>>()
    );
    for n in &nodes {
        n.stop().await.expect("stop");
    }
    nodes[0].force_cleanup_all_tasks().await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_reregisters_and_resumes_after_a_redis_restart() {
    conformance::init_tracing();
    if support::service_env("DCRON_REDIS_URL").is_none() {
        return;
    }
    let mut server = Throwaway::start("redis-node-restart", 31230);
    let ns = fresh_ns("node-restart");
    let ledger = Ledger::default();
    let registry = server.registry().await;
    let n = recording_node(&registry, &ns, "n1", &ledger);
    let (recorder, me) = (ledger.clone(), "n1".to_string());
    n.add_func("tick", "* * * * * *", move |ctx: TaskContext| {
        let (recorder, me) = (recorder.clone(), me.clone());
        async move {
            recorder.record(&ctx, &me);
            Ok(())
        }
    })
    .await
    .expect("add");
    n.start().await.expect("start");
    let l = ledger.clone();
    eventually(Duration::from_secs(10), "a first run", || {
        let l = l.clone();
        async move { !l.fires("tick").is_empty() }
    })
    .await;
    server.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart();
    let restarted = now_ms();
    let restarted_at = Instant::now();
    // The heartbeat finds the registration gone (Ok(false)) and registers again.
    eventually(Duration::from_secs(20), "re-registration", || async {
        ids(&registry, &ns).await.contains("n1")
    })
    .await;
    let back = restarted_at.elapsed();
    let l = ledger.clone();
    eventually(Duration::from_secs(20), "runs after the restart", || {
        let l = l.clone();
        async move { l.fires("tick").iter().any(|t| *t > restarted + 1000) }
    })
    .await;
    eprintln!(
        "node re-registered {back:?} and ran again {:?} after the redis restart",
        restarted_at.elapsed()
    );
    n.stop().await.expect("stop");
    ledger.assert_no_duplicates();
}

/// Failover with the registry's default timing (node TTL 10 s, heartbeat
/// 2 s, reload 10 s): how long until a crashed node's tasks run elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashed_node_fails_over_with_default_timing() {
    conformance::init_tracing();
    let h = harness!();
    let ns = fresh_ns("default-failover");
    let ledger = Ledger::default();
    let tasks: Vec<String> = (0..12).map(|i| format!("every-second-{i:02}")).collect();
    let mut nodes = Vec::new();
    for id in ["node-a", "node-b", "node-c"] {
        let n = Dcron::builder(h.connect().await)
            .namespace(&ns)
            .node_id(id)
            .strategy(Strategy::Consistent)
            .build()
            .expect("node");
        for t in &tasks {
            let (recorder, me) = (ledger.clone(), id.to_string());
            n.add_func(t, "* * * * * *", move |ctx: TaskContext| {
                let (recorder, me) = (recorder.clone(), me.clone());
                async move {
                    recorder.record(&ctx, &me);
                    Ok(())
                }
            })
            .await
            .expect("add");
        }
        n.start().await.expect("start");
        nodes.push(n);
    }
    let owned_by = |nodes: &[Dcron]| -> usize { nodes.iter().map(|n| n.owned_tasks().len()).sum() };
    eventually(Duration::from_secs(20), "ownership to settle", || async {
        owned_by(&nodes) == tasks.len() && nodes.iter().all(|n| !n.owned_tasks().is_empty())
    })
    .await;
    let orphaned = nodes[2].owned_tasks();
    let observer = h.connect().await;
    let mut events = observer.watch(&ns).await.expect("watch");
    let crashed_at = now_ms();
    let crashed = Instant::now();
    nodes[2].kill().await;
    // How much of its TTL the crashed node had left (server clock).
    let mut con = h.raw().await;
    let expiry: f64 = redis::cmd("ZSCORE")
        .arg(format!("{{{ns}}}:nodes"))
        .arg("node-c")
        .query_async(&mut con)
        .await
        .expect("score");
    let left_ms = expiry as i64 - server_ms(&mut con).await;
    expect_event(
        &mut events,
        Duration::from_secs(20),
        "NodeDelete node-c",
        |e| *e == WatchEvent::NodeDelete("node-c".into()),
    )
    .await;
    let deleted = crashed.elapsed();
    eventually(
        Duration::from_secs(30),
        "the survivors to own every task",
        || async { owned_by(&nodes[..2]) == tasks.len() },
    )
    .await;
    let took_over = crashed.elapsed();
    let l = ledger.clone();
    let orphans = orphaned.clone();
    eventually(
        Duration::from_secs(10),
        "orphaned tasks to run on a survivor",
        || {
            let (l, orphans) = (l.clone(), orphans.clone());
            async move {
                orphans.iter().all(|t| {
                    l.runs()
                        .iter()
                        .any(|r| &r.task == t && r.fire_time > crashed_at && r.node != "node-c")
                })
            }
        },
    )
    .await;
    let ran = crashed.elapsed();
    for n in &nodes[..2] {
        n.stop().await.expect("stop");
    }
    ledger.assert_no_duplicates();
    for t in &orphaned {
        assert!(
            ledger
                .runs()
                .iter()
                .filter(|r| &r.task == t && r.fire_time > crashed_at)
                .all(|r| r.node != "node-c"),
            "{t}: the crashed node kept running"
        );
    }
    eprintln!(
        "default timing: the crashed node had {left_ms} ms of TTL left; NodeDelete {deleted:?}, \
         {} orphaned tasks owned by survivors {took_over:?} and running {ran:?} after the crash",
        orphaned.len()
    );
}

// ---------------------------------------------------------------------------
// Claims.

// ---------------------------------------------------------------------------
// Benchmark.
