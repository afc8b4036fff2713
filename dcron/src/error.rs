//! The one error type of the crate.

use std::time::Duration;

/// A boxed error from a registry client library, kept as the `source`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in dcron. Each message says what to do.
///
/// `Debug` prints the message and its causes, so `main() -> dcron::Result<()>`
/// reports a failure in words; match on the variants for details.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A task of that name is already defined.
    #[error("task `{0}` already exists; use a force_* call to overwrite it")]
    TaskExists(String),
    /// The task carries a tombstone.
    #[error(
        "task `{0}` is marked deleted; call reuse_deleted_task or a force_* call to add it again"
    )]
    TaskDeleted(String),
    /// The cron expression (or its time zone) could not be parsed.
    #[error("invalid cron expression `{expr}`: {reason}")]
    InvalidCron {
        /// The expression as given.
        expr: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Task names are 1–200 characters of `[A-Za-z0-9._:@-]`.
    #[error("invalid task name `{name}`: {reason}; use 1-200 characters of A-Z a-z 0-9 . _ : @ -")]
    InvalidTaskName {
        /// The name as given.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The dynamic task payload is above the configured limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes; store large data elsewhere and pass a reference")]
    PayloadTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// `start` was called on a running node.
    #[error("the node is already running; call stop first")]
    AlreadyRunning,
    /// The call needs a started node.
    #[error("the node is not running; call start first")]
    NotRunning,
    /// An option has a value that cannot work.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The registry failed; `kind` says whether retrying can help,
    /// `source` has the backend's cause.
    #[error("{backend} registry: {context}")]
    Registry {
        /// Which backend (`memory`, `redis`, `etcd`, `zookeeper`, `consul`).
        backend: &'static str,
        /// What sort of failure it is.
        kind: RegistryErrorKind,
        /// What dcron was doing.
        context: String,
        /// The client library's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// A task body returned an error.
    #[error("task `{task}` failed at fire time {fire_time}: {source}")]
    TaskFailed {
        /// The task's name.
        task: String,
        /// The scheduled fire time of the run, epoch ms.
        fire_time: i64,
        /// The body's error.
        #[source]
        source: BoxError,
    },
    /// A task body panicked; the panic was caught.
    #[error("task `{task}` panicked at fire time {fire_time}: {message}")]
    TaskPanicked {
        /// The task's name.
        task: String,
        /// The scheduled fire time of the run, epoch ms.
        fire_time: i64,
        /// The panic message, if it was a string.
        message: String,
    },
    /// A fire time of a task this node owned did not run (see
    /// [`MissReason`]). Late fires are not missed: they run late.
    #[error("task `{task}` missed its fire at {} ({fire_time}): {reason}", crate::clock::rfc3339(*.fire_time))]
    FireMissed {
        /// The task's name.
        task: String,
        /// The scheduled fire time that did not run, epoch ms.
        fire_time: i64,
        /// Why it did not run.
        reason: MissReason,
    },
    /// Another live process registered the same node id.
    #[error("node id `{0}` is in use by another live node; give each process its own node id, or wait for the other one to stop or expire")]
    NodeIdInUse(String),
    /// A bounded wait ran out.
    #[error("timed out after {after:?} while {what}; check that the registry is reachable")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The bound that was exceeded.
        after: Duration,
    },
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")?;
        let mut cause = std::error::Error::source(self);
        while let Some(err) = cause {
            write!(f, "\n  caused by: {err}")?;
            cause = err.source();
        }
        Ok(())
    }
}

impl Error {
    /// A registry failure of kind [`Other`](RegistryErrorKind::Other) with
    /// the backend's error as its source.
    pub fn registry(
        backend: &'static str,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Registry {
            backend,
            kind: RegistryErrorKind::Other,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A registry failure without an underlying library error.
    pub fn registry_msg(backend: &'static str, context: impl Into<String>) -> Self {
        Error::Registry {
            backend,
            kind: RegistryErrorKind::Other,
            context: context.into(),
            source: None,
        }
    }

    /// A registry that could not be reached or did not answer in time.
    pub fn unavailable(
        backend: &'static str,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::registry(backend, context, source).with_kind(RegistryErrorKind::Unavailable)
    }

    /// The same registry error with another kind (other errors unchanged).
    pub fn with_kind(mut self, new: RegistryErrorKind) -> Self {
        if let Error::Registry { kind, .. } = &mut self {
            *kind = new;
        }
        self
    }

    /// A copy of this error for another claim of the same failed batch:
    /// the same message and kind (so it is retried or not the same way),
    /// the source folded into the message.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Timeout { what, after } => Error::Timeout {
                what: what.clone(),
                after: *after,
            },
            Error::Registry {
                backend,
                kind,
                context,
                source,
            } => {
                let context = match source {
                    Some(source) => format!("{context}: {source}"),
                    None => context.clone(),
                };
                Error::registry_msg(backend, context).with_kind(*kind)
            }
            other => Error::registry_msg("registry", other.to_string()),
        }
    }

    /// What sort of registry failure this is, for registry errors.
    pub fn registry_kind(&self) -> Option<RegistryErrorKind> {
        match self {
            Error::Registry { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// Whether trying the same call again later may succeed: the registry
    /// was unavailable or a bounded wait ran out. Every retry loop of the
    /// crate and of its backends decides with this.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. }
                | Error::Registry {
                    kind: RegistryErrorKind::Unavailable,
                    ..
                }
        )
    }
}

/// The sort of a registry failure ([`Error::Registry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryErrorKind {
    /// The registry could not be reached or did not answer in time
    /// (connection refused or lost, timeout, no leader, session moving):
    /// retrying later may succeed.
    Unavailable,
    /// The registry refused the request (authentication, permission,
    /// quota, a request it cannot take): retrying does not help until the
    /// configuration changes.
    Rejected,
    /// Anything else, such as an answer dcron does not understand.
    Other,
}

/// Why a fire did not run ([`Error::FireMissed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissReason {
    /// The claim could not be taken before the fire left the catch-up
    /// window (the registry was unreachable or too slow for that long).
    ClaimFailed,
    /// [`Overlap::Skip`](crate::Overlap::Skip): the previous run of the task
    /// was still running on this node when the fire came due.
    Overlap,
    /// The node itself did not run for longer than the late window
    /// (process paused, clock jump): reported once per task, for the first
    /// fire of the gap; the fires up to the window's start were skipped.
    NodeStalled,
}

impl std::fmt::Display for MissReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MissReason::ClaimFailed => {
                "the registry did not take the claim within the catch-up window"
            }
            MissReason::Overlap => "the previous run was still running (overlap = skip)",
            MissReason::NodeStalled => "the node was stalled for longer than the catch-up window",
        })
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_reads_like_a_message_with_its_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let err = Error::unavailable("redis", "cannot connect to 127.0.0.1:6379/0", io);
        assert_eq!(
            format!("{err:?}"),
            "redis registry: cannot connect to 127.0.0.1:6379/0\n  caused by: connection refused"
        );
        assert!(err.is_retryable());
        assert_eq!(err.registry_kind(), Some(RegistryErrorKind::Unavailable));
        assert!(!Error::registry_msg("etcd", "refused").is_retryable());
    }
}
