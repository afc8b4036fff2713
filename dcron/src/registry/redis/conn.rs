//! Calls over the connection manager: each bounded by the request timeout,
//! an idempotent one sent once more after a dropped connection, and every
//! redis error classified into a [`RegistryErrorKind`] where it is
//! converted.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{FromRedisValue, RedisError, ScriptInvocation};

use super::{RedisRegistry, BACKEND};
use crate::backoff::Backoff;
use crate::error::{Error, RegistryErrorKind, Result};

/// Pause before the retry of an idempotent call (the manager reconnects
/// meanwhile).
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Tries of an idempotent call: the first and one retry.
const IDEMPOTENT_TRIES: u32 = 2;
/// Fields per `HSCAN` round trip.
const SCAN_COUNT: usize = 1000;

/// One request, sent again as-is on a retry.
pub(super) enum Req<'a> {
    Cmd(redis::Cmd),
    Script(ScriptInvocation<'a>),
    Pipe(redis::Pipeline),
}

impl Req<'_> {
    async fn send<T: FromRedisValue>(&self, con: &mut ConnectionManager) -> redis::RedisResult<T> {
        match self {
            Req::Cmd(cmd) => cmd.query_async(con).await,
            Req::Script(inv) => inv.invoke_async(con).await,
            Req::Pipe(pipe) => pipe.query_async(con).await,
        }
    }
}

/// What sort of failure `err` is: the server unreachable, gone or busy
/// (retrying later may help), the request refused (it will not), or else.
pub(super) fn kind_of(err: &RedisError) -> RegistryErrorKind {
    if err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
    {
        return RegistryErrorKind::Unavailable;
    }
    if err.kind() == redis::ErrorKind::AuthenticationFailed {
        return RegistryErrorKind::Rejected;
    }
    match err.code() {
        // READONLY: a write reached a replica, the master is moving.
        Some("LOADING" | "TRYAGAIN" | "BUSY" | "MASTERDOWN" | "CLUSTERDOWN" | "READONLY") => {
            RegistryErrorKind::Unavailable
        }
        Some("NOAUTH" | "WRONGPASS" | "NOPERM") => RegistryErrorKind::Rejected,
        _ => RegistryErrorKind::Other,
    }
}

/// `err` as a registry error of its kind, with `context`.
pub(super) fn registry_error(context: String, err: RedisError) -> Error {
    let kind = kind_of(&err);
    Error::registry(BACKEND, context, err).with_kind(kind)
}

impl RedisRegistry {
    /// Sends `req`, bounded by the request timeout; an idempotent request is
    /// sent once more after a retryable failure (the manager reconnects).
    pub(super) async fn query<T: FromRedisValue>(
        &self,
        what: &str,
        idempotent: bool,
        req: Req<'_>,
    ) -> Result<T> {
        let inner = &self.inner;
        let tries = if idempotent { IDEMPOTENT_TRIES } else { 1 };
        let attempt = async {
            let mut con = inner.manager.clone();
            let mut backoff = Backoff::new(RETRY_PAUSE, RETRY_PAUSE);
            loop {
                let err = match req.send::<T>(&mut con).await {
                    Ok(value) => return Ok(value),
                    Err(err) => registry_error(format!("{what} on {}", inner.addr), err),
                };
                if !err.is_retryable() || backoff.failures() + 1 >= tries {
                    return Err(err);
                }
                tracing::debug!(backend = BACKEND, what, %err, "retrying once");
                tokio::time::sleep(backoff.fail()).await;
            }
        };
        let bound = inner.options.request_timeout;
        tokio::time::timeout(bound, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout {
                    what: format!("redis {what} on {}", inner.addr),
                    after: bound,
                })
            })
    }

    /// Runs an idempotent script answering a number.
    pub(super) async fn run(&self, what: &str, inv: ScriptInvocation<'_>) -> Result<i64> {
        self.query(what, true, Req::Script(inv)).await
    }

    /// Every field of hash `key` (HSCAN with a cursor, deduplicated).
    pub(super) async fn scan_hash(
        &self,
        key: &str,
        what: &str,
    ) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("HSCAN");
            cmd.arg(key).arg(cursor).arg("COUNT").arg(SCAN_COUNT);
            let (next, flat): (u64, Vec<Vec<u8>>) = self.query(what, true, Req::Cmd(cmd)).await?;
            for pair in flat.chunks_exact(2) {
                let [field, value] = pair else { continue };
                match String::from_utf8(field.clone()) {
                    Ok(name) => {
                        out.insert(name, value.clone());
                    }
                    Err(_) => tracing::warn!(
                        backend = BACKEND,
                        key,
                        "skipping a field whose name is not UTF-8"
                    ),
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a server answers with `-<code> ...`.
    fn server(code: &str) -> RedisError {
        let reply = format!("-{code} something\r\n");
        match redis::parse_redis_value(reply.as_bytes()) {
            Ok(redis::Value::ServerError(err)) => err.into(),
            other => panic!("{code}: {other:?}"),
        }
    }

    #[test]
    fn errors_are_classified() {
        use RegistryErrorKind::{Other, Rejected, Unavailable};
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(kind_of(&RedisError::from(refused)), Unavailable);
        for code in ["LOADING", "TRYAGAIN", "BUSY", "READONLY"] {
            assert_eq!(kind_of(&server(code)), Unavailable, "{code}");
        }
        for code in ["NOAUTH", "WRONGPASS", "NOPERM"] {
            assert_eq!(kind_of(&server(code)), Rejected, "{code}");
        }
        for code in ["ERR", "WRONGTYPE", "NOSCRIPT"] {
            assert_eq!(kind_of(&server(code)), Other, "{code}");
        }
        let parse = RedisError::from((redis::ErrorKind::Parse, "bad reply"));
        assert_eq!(kind_of(&parse), Other);
        assert!(registry_error("call".into(), server("LOADING")).is_retryable());
        assert!(!registry_error("call".into(), server("NOPERM")).is_retryable());
    }
}
