//! Reads and writes of plain keys: directory listings page by page at one
//! revision, create-only writes, the current revision.

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};

use super::EtcdRegistry;
use crate::error::Result;
use crate::registry::kit::keys::{Kind, Layout};

/// Keys per page of a range read.
const PAGE: i64 = 256;

impl EtcdRegistry {
    /// Every key/value of `kind` in `layout`, in key order, read page by
    /// page at one revision (a consistent snapshot).
    pub(super) async fn list(
        &self,
        layout: &Layout,
        kind: Kind,
        keys_only: bool,
        what: &str,
    ) -> Result<Vec<KeyValue>> {
        let prefix = layout.prefix(kind);
        let end = prefix_end(&prefix);
        let mut from = prefix.into_bytes();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            if keys_only {
                options = options.with_keys_only();
            }
            let mut resp = self
                .retrying_long(what, |h| {
                    let (from, options) = (from.clone(), options.clone());
                    async move {
                        let mut kv = h.kv;
                        kv.get(from, Some(options)).await
                    }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else { break };
            from = last.key().to_vec();
            from.push(0);
            out.extend(kvs);
            if !more {
                break;
            }
        }
        Ok(out)
    }

    /// Writes `value` at `key` unless the key exists. `true` if written, or
    /// if a retried create whose first attempt was applied finds its own
    /// value; `false` if something else is stored.
    pub(super) async fn create(&self, key: &str, value: &[u8], what: &str) -> Result<bool> {
        let resp = self
            .retrying(what, |h| async move {
                let txn = Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, value, None)])
                    .or_else([TxnOp::get(key, None)]);
                let mut kv = h.kv;
                kv.txn(txn).await
            })
            .await?;
        if resp.succeeded() {
            return Ok(true);
        }
        Ok(resp.op_responses().into_iter().any(|op| {
            matches!(op, TxnOpResponse::Get(get)
                if get.kvs().first().is_some_and(|kv| kv.value() == value && kv.version() == 1))
        }))
    }

    /// The current store revision of the cluster.
    pub async fn revision(&self) -> Result<i64> {
        let resp = self
            .retrying("read the current revision", |h| async move {
                let mut kv = h.kv;
                kv.get("/", Some(GetOptions::new().with_count_only())).await
            })
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }
}

/// The first key after every key starting with `prefix`.
pub(super) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: no end (etcd's "\0" = to the end of the key space).
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("/ns/tasks/"), b"/ns/tasks0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
