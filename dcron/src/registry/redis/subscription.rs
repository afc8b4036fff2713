//! The pub/sub connection of a watch: its own RESP3 connection subscribed
//! to the events channel, its pushes going to an unbounded receiver.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, RedisError};
use tokio::sync::mpsc::{self, UnboundedReceiver};

use super::conn::registry_error;
use super::Inner;
use crate::error::{Error, RegistryErrorKind, Result};

/// A subscribed connection and the pushes it receives.
pub(super) type Subscription = (MultiplexedConnection, UnboundedReceiver<PushInfo>);

/// Opens a RESP3 connection subscribed to `channel`, bounded by the
/// connect and request timeouts together.
pub(super) async fn subscribe(inner: &Inner, channel: &str) -> Result<Subscription> {
    let (push_tx, push_rx) = mpsc::unbounded_channel();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(inner.options.connect_timeout))
        .set_response_timeout(Some(inner.options.request_timeout))
        .set_push_sender(push_tx);
    let subscribing = async {
        let mut con = inner
            .pubsub_client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        con.subscribe(channel).await?;
        Ok::<_, RedisError>(con)
    };
    let bound = inner.options.connect_timeout + inner.options.request_timeout;
    match tokio::time::timeout(bound, subscribing).await {
        Ok(Ok(con)) => Ok((con, push_rx)),
        Ok(Err(err)) => {
            let err = registry_error(
                format!("cannot subscribe to {channel} on {}", inner.addr),
                err,
            );
            // A server that answers but refuses RESP3 or SUBSCRIBE is too old.
            Err(match err.registry_kind() {
                Some(RegistryErrorKind::Other) => with_hint(err),
                _ => err,
            })
        }
        Err(_) => Err(Error::Timeout {
            what: format!("subscribing to {channel} on redis {}", inner.addr),
            after: bound,
        }),
    }
}

fn with_hint(mut err: Error) -> Error {
    if let Error::Registry { context, .. } = &mut err {
        context.push_str(" (the watch needs RESP3 pub/sub: Redis 6 or later)");
    }
    err
}

/// Checks the connection still answers (detects half-open sockets).
pub(super) async fn ping(con: &mut MultiplexedConnection, bound: Duration) -> Result<()> {
    let ping = redis::cmd("PING");
    match tokio::time::timeout(bound, ping.query_async::<redis::Value>(con)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(registry_error("ping".into(), err)),
        Err(_) => Err(Error::Timeout {
            what: "redis ping".into(),
            after: bound,
        }),
    }
}
