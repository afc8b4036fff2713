//! What the client library's errors mean: every conversion goes through
//! [`zk_err`], which gives the error its [`RegistryErrorKind`] so that
//! every retry is decided with [`Error::is_retryable`].

use std::time::Duration;

use zookeeper_client as zk;

use super::BACKEND;
use crate::error::{Error, RegistryErrorKind};

/// The sort of failure a client library error is.
pub(super) fn kind_of(err: &zk::Error) -> RegistryErrorKind {
    match err {
        // The link or the session is gone or moving; a new one may serve.
        zk::Error::ConnectionLoss
        | zk::Error::SessionMoved
        | zk::Error::SessionExpired
        | zk::Error::ClientClosed
        | zk::Error::NoHosts
        | zk::Error::Timeout
        | zk::Error::Throttled => RegistryErrorKind::Unavailable,
        zk::Error::AuthFailed
        | zk::Error::NoAuth
        | zk::Error::InvalidAcl
        | zk::Error::QuotaExceeded => RegistryErrorKind::Rejected,
        _ => RegistryErrorKind::Other,
    }
}

/// A registry error for `err`, met while doing `context`.
pub(super) fn zk_err(context: impl Into<String>, err: zk::Error) -> Error {
    let kind = kind_of(&err);
    Error::registry(BACKEND, context, err).with_kind(kind)
}

/// The connection is down and the client library is reconnecting.
pub(super) fn disconnected() -> Error {
    Error::registry_msg(
        BACKEND,
        "disconnected from ZooKeeper; the client is reconnecting, try again shortly",
    )
    .with_kind(RegistryErrorKind::Unavailable)
}

/// Another call is opening a new session.
pub(super) fn renewing() -> Error {
    Error::registry_msg(
        BACKEND,
        "a new ZooKeeper session is being opened; try again shortly",
    )
    .with_kind(RegistryErrorKind::Unavailable)
}

/// A bounded wait on ZooKeeper that ran out.
pub(super) fn timed_out(what: impl std::fmt::Display, after: Duration) -> Error {
    Error::Timeout {
        what: format!("{what} in ZooKeeper"),
        after,
    }
}

/// `n` errors for one failure that answered `n` requests at once, each
/// keeping its kind (so retryable copies stay retryable).
pub(super) fn copies(err: Error, n: usize) -> Vec<Error> {
    let copy = |err: &Error| match err {
        Error::Timeout { what, after } => Error::Timeout {
            what: what.clone(),
            after: *after,
        },
        other => Error::registry_msg(BACKEND, other.to_string())
            .with_kind(other.registry_kind().unwrap_or(RegistryErrorKind::Other)),
    };
    let mut out: Vec<Error> = (1..n).map(|_| copy(&err)).collect();
    if n > 0 {
        out.push(err);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_classified() {
        for (err, kind) in [
            (zk::Error::ConnectionLoss, RegistryErrorKind::Unavailable),
            (zk::Error::SessionMoved, RegistryErrorKind::Unavailable),
            (zk::Error::Timeout, RegistryErrorKind::Unavailable),
            (zk::Error::AuthFailed, RegistryErrorKind::Rejected),
            (zk::Error::NoAuth, RegistryErrorKind::Rejected),
            (zk::Error::InvalidAcl, RegistryErrorKind::Rejected),
            (zk::Error::BadVersion, RegistryErrorKind::Other),
        ] {
            let converted = zk_err("testing", err.clone());
            assert_eq!(converted.registry_kind(), Some(kind), "{err}");
        }
        assert!(disconnected().is_retryable() && renewing().is_retryable());
    }

    #[test]
    fn copies_keep_the_kind() {
        let errs = copies(zk_err("reading", zk::Error::ConnectionLoss), 3);
        assert_eq!(errs.len(), 3);
        assert!(errs.iter().all(Error::is_retryable));
        assert!(copies(disconnected(), 0).is_empty());
    }
}
