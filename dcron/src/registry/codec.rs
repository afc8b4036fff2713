//! Decoding of stored values, shared by every backend.
//!
//! Anything in the registry may have been written by another program or an
//! older version. These helpers turn bytes into values or log and skip.

use serde::de::DeserializeOwned;

use crate::node::Node;
use crate::registry::Claim;
use crate::task::{validate_task_name, TaskMeta};

/// Decodes a stored JSON value, logging and returning `None` if it is not one.
pub fn decode<T: DeserializeOwned>(backend: &str, key: &str, raw: &[u8]) -> Option<T> {
    match serde_json::from_slice(raw) {
        Ok(v) => Some(v),
        Err(err) => {
            tracing::warn!(backend, key, %err, "skipping corrupt value in the registry");
            None
        }
    }
}

/// Decodes a node record stored under `id`; skips records whose id differs.
pub fn decode_node(backend: &str, id: &str, raw: &[u8]) -> Option<Node> {
    let node: Node = decode(backend, id, raw)?;
    if node.id != id {
        tracing::warn!(backend, key = id, stored = %node.id, "skipping node record stored under another id");
        return None;
    }
    Some(node)
}

/// Decodes a task definition stored under `name`; skips invalid names and
/// definitions stored under another name.
pub fn decode_task(backend: &str, name: &str, raw: &[u8]) -> Option<TaskMeta> {
    let meta: TaskMeta = decode(backend, name, raw)?;
    if meta.name != name || validate_task_name(name).is_err() {
        tracing::warn!(backend, key = name, stored = %meta.name, "skipping task stored under a wrong or invalid name");
        return None;
    }
    Some(meta)
}

/// Decodes a claim watermark.
pub fn decode_claim(backend: &str, name: &str, raw: &[u8]) -> Option<Claim> {
    decode(backend, name, raw)
}

/// Encodes a value as JSON. Our own types always serialise.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}
