//! etcd's errors, sorted once where they are converted: what kind of
//! registry error each is (which decides every retry), and whether the
//! member could not be reached at all.

use etcd_client::Error as EtcdError;

use super::BACKEND;
use crate::error::{Error, RegistryErrorKind};

/// gRPC status codes (numbers fixed by the gRPC spec) that etcd returns.
mod code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const ABORTED: i32 = 10;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// The registry error for `err`, met while doing `context`, of its kind.
pub(super) fn convert(err: EtcdError, context: impl Into<String>) -> Error {
    let kind = kind_of(&err);
    Error::registry(BACKEND, context, err).with_kind(kind)
}

/// Unreachable, timed out, leaderless or cut off in flight: `Unavailable`;
/// authentication, permission or a full database: `Rejected`.
fn kind_of(err: &EtcdError) -> RegistryErrorKind {
    use RegistryErrorKind::{Other, Rejected, Unavailable};
    match err {
        EtcdError::TransportError(_) | EtcdError::IoError(_) | EtcdError::WatchError(_) => {
            Unavailable
        }
        EtcdError::LeaseKeepAliveError(msg) if is_lease_gone(msg) => Other,
        EtcdError::LeaseKeepAliveError(_) => Unavailable,
        EtcdError::GRpcStatus(status) => {
            let message = status.message();
            match status.code() as i32 {
                code::PERMISSION_DENIED | code::UNAUTHENTICATED => Rejected,
                // etcd answers bad credentials and unknown users this way.
                code::INVALID_ARGUMENT | code::FAILED_PRECONDITION
                    if ["auth", "user", "role", "permission"]
                        .iter()
                        .any(|w| message.contains(w)) =>
                {
                    Rejected
                }
                code::RESOURCE_EXHAUSTED if message.contains("space exceeded") => Rejected,
                // "too many requests", elections, stream resets, overload.
                code::UNAVAILABLE
                | code::UNKNOWN
                | code::CANCELLED
                | code::DEADLINE_EXCEEDED
                | code::ABORTED
                | code::RESOURCE_EXHAUSTED
                | code::INTERNAL => Unavailable,
                _ => Other,
            }
        }
        _ => Other,
    }
}

/// Whether `err` says the member could not be reached (a client-side
/// transport failure, not an answer of the member).
pub(super) fn unreachable(err: &EtcdError) -> bool {
    match err {
        EtcdError::TransportError(_) | EtcdError::IoError(_) => true,
        EtcdError::GRpcStatus(status) => {
            status.code() as i32 == code::UNAVAILABLE && std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

/// Whether `err` is etcd's "no leader" answer (to a request requiring one).
pub(super) fn is_no_leader(err: &EtcdError) -> bool {
    matches!(err, EtcdError::GRpcStatus(status)
        if status.code() as i32 == code::UNAVAILABLE && status.message().contains("no leader"))
}

/// The library's words for a keep-alive answered with TTL <= 0.
fn is_lease_gone(msg: &str) -> bool {
    msg.contains("not found")
}

/// The etcd client error inside a registry error, if any.
fn etcd_cause(err: &Error) -> Option<&EtcdError> {
    match err {
        Error::Registry {
            source: Some(source),
            ..
        } => source.downcast_ref::<EtcdError>(),
        _ => None,
    }
}

/// Whether etcd answered "not found" (a lease already revoked or expired).
pub(super) fn is_not_found(err: &Error) -> bool {
    matches!(etcd_cause(err), Some(EtcdError::GRpcStatus(status)) if status.code() as i32 == code::NOT_FOUND)
}

/// Whether a keep-alive found its lease gone.
pub(super) fn is_lease_gone_error(err: &Error) -> bool {
    matches!(etcd_cause(err), Some(EtcdError::LeaseKeepAliveError(msg)) if is_lease_gone(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_sorted_by_kind() {
        let kind = |e: EtcdError| convert(e, "x").registry_kind();
        let unavailable = Some(RegistryErrorKind::Unavailable);
        assert_eq!(kind(EtcdError::WatchError("reset".into())), unavailable);
        assert_eq!(
            kind(EtcdError::LeaseKeepAliveError("closed".into())),
            unavailable
        );
        let gone = convert(
            EtcdError::LeaseKeepAliveError("lease not found".into()),
            "x",
        );
        assert!(!gone.is_retryable() && is_lease_gone_error(&gone));
        assert_eq!(
            kind(EtcdError::InvalidArgs("bad".into())),
            Some(RegistryErrorKind::Other)
        );
        let copied = convert(EtcdError::WatchError("reset".into()), "claim").duplicate();
        assert!(copied.is_retryable() && copied.to_string().contains("claim"));
    }
}
