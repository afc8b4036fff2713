//! Node registrations: ephemeral znodes owned by the registry's session,
//! so the session's own keep-alive is the node's liveness.

use zookeeper_client as zk;
use zookeeper_client::{Client, Stat};

use super::errors::zk_err;
use super::session::Inner;
use super::znodes::MAX_ATTEMPTS;
use super::BACKEND;
use crate::error::{Error, Result};

impl Inner {
    /// Writes the node record at `path` as an ephemeral of `client`'s
    /// session, replacing one left by an earlier session.
    pub async fn register_at(
        &self,
        client: &Client,
        dir: &str,
        path: &str,
        data: &[u8],
    ) -> Result<()> {
        let me = client.session_id().0;
        for _ in 0..MAX_ATTEMPTS {
            let err = match client.create(path, data, &self.settings.ephemeral()).await {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            match err {
                zk::Error::NoNode => self.ensure_dir(client, dir).await?,
                zk::Error::NodeExists => {
                    let Some(stat) = self.stat(client, path).await? else {
                        continue;
                    };
                    if stat.ephemeral_owner == me {
                        match client.set_data(path, data, Some(stat.version)).await {
                            Ok(_) => return Ok(()),
                            Err(zk::Error::BadVersion | zk::Error::NoNode) => continue,
                            Err(err) => return Err(zk_err(format!("writing {path}"), err)),
                        }
                    }
                    // Left by an earlier session of this node (or a foreign
                    // writer): replace it with one this session owns.
                    match client.delete(path, Some(stat.version)).await {
                        Ok(()) | Err(zk::Error::NoNode | zk::Error::BadVersion) => {}
                        Err(err) => return Err(zk_err(format!("replacing {path}"), err)),
                    }
                }
                err => return Err(zk_err(format!("creating {path}"), err)),
            }
        }
        Err(Error::registry_msg(
            BACKEND,
            format!("registering {path} kept racing with another writer"),
        ))
    }

    /// The registration at `path` if `client`'s session owns it.
    pub async fn owned(&self, client: &Client, path: &str) -> Result<Option<Stat>> {
        let stat = self.stat(client, path).await?;
        Ok(stat.filter(|s| s.ephemeral_owner == client.session_id().0))
    }

    /// Rewrites the record at `path`; `Ok(false)` if this session does not
    /// own it (any more).
    pub async fn update_at(&self, client: &Client, path: &str, data: &[u8]) -> Result<bool> {
        for _ in 0..MAX_ATTEMPTS {
            let Some(stat) = self.owned(client, path).await? else {
                return Ok(false);
            };
            match client.set_data(path, data, Some(stat.version)).await {
                Ok(_) => return Ok(true),
                Err(zk::Error::NoNode) => return Ok(false),
                Err(zk::Error::BadVersion) => continue,
                Err(err) => return Err(zk_err(format!("writing {path}"), err)),
            }
        }
        Err(Error::registry_msg(
            BACKEND,
            format!("updating {path} kept racing with another writer"),
        ))
    }

    async fn stat(&self, client: &Client, path: &str) -> Result<Option<Stat>> {
        client
            .check_stat(path)
            .await
            .map_err(|e| zk_err(format!("checking {path}"), e))
    }
}
