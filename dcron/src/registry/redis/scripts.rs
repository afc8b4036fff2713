//! The Lua scripts, one `.lua` file each (in `lua/`), loaded once.
//!
//! Every write runs as one script so that the write and its change message
//! are one atomic step on the server; node scripts share a prelude that
//! reads the server's clock and reaps expired members.

use std::sync::LazyLock;

use redis::Script;

/// Extra lifetime of a node record key beyond its liveness (garbage guard).
const RECORD_GRACE_MS: u64 = 60_000;

const PRELUDE: &str = include_str!("lua/prelude.lua");
const ALIVE: &str = include_str!("lua/alive.lua");

/// A node script: the prelude, the record grace, then `body`.
fn node_script(body: &[&str]) -> Script {
    let body = body.concat();
    Script::new(&format!(
        "{PRELUDE}\nlocal GRACE = {RECORD_GRACE_MS}\n{body}"
    ))
}

pub(super) static REGISTER: LazyLock<Script> =
    LazyLock::new(|| node_script(&[include_str!("lua/register.lua")]));
pub(super) static HEARTBEAT: LazyLock<Script> =
    LazyLock::new(|| node_script(&[ALIVE, include_str!("lua/heartbeat.lua")]));
pub(super) static UPDATE_NODE: LazyLock<Script> =
    LazyLock::new(|| node_script(&[ALIVE, include_str!("lua/update_node.lua")]));
pub(super) static UNREGISTER: LazyLock<Script> =
    LazyLock::new(|| node_script(&[include_str!("lua/unregister.lua")]));
pub(super) static NODES: LazyLock<Script> =
    LazyLock::new(|| node_script(&[include_str!("lua/nodes.lua")]));
pub(super) static SWEEP: LazyLock<Script> =
    LazyLock::new(|| node_script(&[include_str!("lua/sweep.lua")]));

pub(super) static PUT_TASK: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/put_task.lua")));
pub(super) static HSET_NEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/hset_new.lua")));
pub(super) static HDEL_PUBLISH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/hdel_publish.lua")));
pub(super) static CLAIM: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/claim.lua")));
pub(super) static CLEAR: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/clear.lua")));
