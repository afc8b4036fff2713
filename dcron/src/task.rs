//! Task definitions: names, dynamic task records, the `Task` trait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{BoxError, Error, Result};

/// Longest accepted task name, in bytes.
pub const MAX_TASK_NAME_LEN: usize = 200;

/// Default limit for a dynamic task's payload (64 KiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024;

/// A dynamic task: stored in the registry, seen by every node, run by the
/// node's task handler.
///
/// Flags (checked in this order after the run is claimed):
/// - `one_shot`: the task runs once in the cluster, ever. The tombstone is
///   written right after the claim is won, *before* the body runs, so a
///   crash during the run cannot lead to a second run elsewhere. The
///   tombstone is kept even when `executed_and_cleanup` is also set.
/// - `executed_and_cleanup`: after the run, the definition and the claim are
///   removed (and the tombstone too, unless `one_shot`).
/// - `executed_and_mark_deleted`: after the run, a tombstone is written; the
///   definition stays, so `reuse_deleted_task` revives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMeta {
    /// Task name: 1–200 characters of `[A-Za-z0-9._:@-]`.
    pub name: String,
    /// Cron expression: 5 fields, or 6 with seconds, or a descriptor such as
    /// `@hourly`; an optional `CRON_TZ=Zone ` prefix sets its time zone.
    pub cron_format: String,
    /// Run once in the whole cluster, then tombstone.
    #[serde(default)]
    pub one_shot: bool,
    /// Tombstone after the run.
    #[serde(default)]
    pub executed_and_mark_deleted: bool,
    /// Remove every trace after the run.
    #[serde(default)]
    pub executed_and_cleanup: bool,
    /// Opaque data handed to the task handler.
    #[serde(default)]
    pub payload: String,
}

impl TaskMeta {
    /// A recurring dynamic task without payload.
    pub fn new(name: impl Into<String>, cron_format: impl Into<String>) -> Self {
        TaskMeta {
            name: name.into(),
            cron_format: cron_format.into(),
            one_shot: false,
            executed_and_mark_deleted: false,
            executed_and_cleanup: false,
            payload: String::new(),
        }
    }

    /// Sets the payload.
    pub fn with_payload(mut self, payload: impl Into<String>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Marks the task one-shot.
    pub fn one_shot(mut self) -> Self {
        self.one_shot = true;
        self
    }
}

/// Checks a task name: 1–200 characters of `[A-Za-z0-9._:@-]`.
///
/// The alphabet keeps every name a single key segment in every backend
/// (no `/`, no spaces, nothing to escape).
pub fn validate_task_name(name: &str) -> Result<()> {
    match name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidTaskName {
            name: name.chars().take(MAX_TASK_NAME_LEN + 16).collect(),
            reason,
        }),
    }
}

/// Checks a namespace or node id (`what`): the same alphabet as task names,
/// which keeps it one key segment in every backend; the error
/// ([`Error::InvalidConfig`]) names what it is.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    match name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidConfig(format!(
            "invalid {what} `{}`: {reason}; use 1-200 characters of A-Z a-z 0-9 . _ : @ -",
            name.chars()
                .take(MAX_TASK_NAME_LEN + 16)
                .collect::<String>()
        ))),
    }
}

/// Why `name` is not a valid name, if it is not.
fn name_problem(name: &str) -> Option<&'static str> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_TASK_NAME_LEN {
        "it is longer than 200 characters"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
    {
        "it contains a character outside the allowed set"
    } else if name == "." || name == ".." {
        "`.` and `..` are reserved"
    } else {
        return None;
    };
    Some(reason)
}

/// What a run of a task knows about itself.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The task's definition. Static tasks get one built from their
    /// `add_*` call (empty payload).
    pub meta: Arc<TaskMeta>,
    /// The scheduled fire time being run, epoch milliseconds (UTC). It is
    /// the claimed watermark, so it doubles as a fencing token: it grows
    /// strictly for each task across the whole cluster.
    pub fire_time: i64,
}

impl TaskContext {
    /// The task's name.
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    /// The dynamic task's payload (empty for static tasks).
    pub fn payload(&self) -> &str {
        &self.meta.payload
    }

    /// The scheduled fire time as a UTC date-time.
    pub fn scheduled(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.fire_time).unwrap_or_default()
    }
}

/// Result of one run of a task body.
pub type TaskResult = std::result::Result<(), BoxError>;

/// A boxed future returned by task bodies.
pub type TaskFuture = Pin<Box<dyn Future<Output = TaskResult> + Send + 'static>>;

/// A static task body. Closures `Fn(TaskContext) -> impl Future<Output =
/// TaskResult>` implement it, so most users never name this trait.
pub trait Task: Send + Sync + 'static {
    /// Runs one fire of the task.
    fn run(&self, ctx: TaskContext) -> TaskFuture;
}

impl<F, Fut> Task for F
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = TaskResult> + Send + 'static,
{
    fn run(&self, ctx: TaskContext) -> TaskFuture {
        Box::pin((self)(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "billing.report", "x:y@z-1_2", &"a".repeat(200)] {
            assert!(validate_task_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a b", "ä", "..", ".", &"a".repeat(201), "a\n"] {
            assert!(
                matches!(validate_task_name(bad), Err(Error::InvalidTaskName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn meta_json_field_names() {
        let m = TaskMeta::new("t", "* * * * *").with_payload("p");
        let v: serde_json::Value = serde_json::to_value(&m).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "cron_format",
                "executed_and_cleanup",
                "executed_and_mark_deleted",
                "name",
                "one_shot",
                "payload"
            ]
        );
    }
}
