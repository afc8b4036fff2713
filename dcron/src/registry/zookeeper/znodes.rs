//! Znode operations the registry calls are made of: directories created
//! on demand, create-or-overwrite, create-if-absent, and pipelined reads
//! and deletes of a directory's children.

use zookeeper_client as zk;
use zookeeper_client::{Client, Stat};

use super::errors::zk_err;
use super::session::Inner;
use super::BACKEND;
use crate::error::{Error, Result};

/// Requests in flight at once in a pipelined batch.
pub(super) const PIPELINE: usize = 512;
/// Bound on rounds of a write racing with concurrent writers or deletes.
pub(super) const MAX_ATTEMPTS: usize = 32;

/// A child's data and stat; `None` if it was deleted meanwhile.
pub(super) type Found = Option<(Vec<u8>, Stat)>;

impl Inner {
    /// `mkdir -p` of a persistent directory.
    pub async fn ensure_dir(&self, client: &Client, dir: &str) -> Result<()> {
        client
            .mkdir(dir, &self.settings.persistent())
            .await
            .map_err(|e| zk_err(format!("creating {dir}"), e))
    }

    /// Creates or overwrites the persistent znode `path` (parents as needed).
    pub async fn upsert(&self, client: &Client, dir: &str, path: &str, data: &[u8]) -> Result<()> {
        for _ in 0..MAX_ATTEMPTS {
            match client.create(path, data, &self.settings.persistent()).await {
                Ok(_) => return Ok(()),
                Err(zk::Error::NoNode) => self.ensure_dir(client, dir).await?,
                Err(zk::Error::NodeExists) => match client.set_data(path, data, None).await {
                    Ok(_) => return Ok(()),
                    Err(zk::Error::NoNode) => continue,
                    Err(err) => return Err(zk_err(format!("writing {path}"), err)),
                },
                Err(err) => return Err(zk_err(format!("creating {path}"), err)),
            }
        }
        Err(Error::registry_msg(
            BACKEND,
            format!("writing {path} kept racing with concurrent deletes"),
        ))
    }

    /// Creates the persistent znode `path` (parents as needed); `Ok(false)`
    /// if it already exists.
    pub async fn create_new(
        &self,
        client: &Client,
        dir: &str,
        path: &str,
        data: &[u8],
    ) -> Result<bool> {
        for _ in 0..2 {
            match client.create(path, data, &self.settings.persistent()).await {
                Ok(_) => return Ok(true),
                Err(zk::Error::NodeExists) => return Ok(false),
                Err(zk::Error::NoNode) => self.ensure_dir(client, dir).await?,
                Err(err) => return Err(zk_err(format!("creating {path}"), err)),
            }
        }
        Err(Error::registry_msg(
            BACKEND,
            format!("the parent of {path} vanished while creating it"),
        ))
    }

    /// Deletes `path`; absent is `Ok`.
    pub async fn delete(&self, client: &Client, path: &str) -> Result<()> {
        match client.delete(path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(()),
            Err(err) => Err(zk_err(format!("deleting {path}"), err)),
        }
    }

    /// Children of `dir`; a missing directory has none.
    pub async fn children(&self, client: &Client, dir: &str) -> Result<Vec<String>> {
        match client.list_children(dir).await {
            Ok(children) => Ok(children),
            Err(zk::Error::NoNode) => Ok(Vec::new()),
            Err(err) => Err(zk_err(format!("listing {dir}"), err)),
        }
    }

    /// Data of `dir/<child>` for every child, pipelined; `None` for
    /// children deleted meanwhile.
    pub async fn read_children(&self, client: &Client, dir: &str) -> Result<Vec<(String, Found)>> {
        let names = self.children(client, dir).await?;
        let mut out = Vec::with_capacity(names.len());
        for chunk in names.chunks(PIPELINE) {
            // Sent together (pipelined), awaited in order.
            let pending: Vec<_> = chunk
                .iter()
                .map(|name| client.get_data(&format!("{dir}/{name}")))
                .collect();
            for (name, fut) in chunk.iter().zip(pending) {
                match fut.await {
                    Ok(found) => out.push((name.clone(), Some(found))),
                    Err(zk::Error::NoNode) => out.push((name.clone(), None)),
                    Err(err) => return Err(zk_err(format!("reading {dir}/{name}"), err)),
                }
            }
        }
        Ok(out)
    }

    /// Deletes every child of `dir`, pipelined.
    pub async fn delete_children(&self, client: &Client, dir: &str) -> Result<()> {
        let names = self.children(client, dir).await?;
        for chunk in names.chunks(PIPELINE) {
            let paths: Vec<String> = chunk.iter().map(|name| format!("{dir}/{name}")).collect();
            let pending: Vec<_> = paths.iter().map(|path| client.delete(path, None)).collect();
            for (path, fut) in paths.iter().zip(pending) {
                match fut.await {
                    Ok(()) | Err(zk::Error::NoNode) => {}
                    Err(err) => return Err(zk_err(format!("deleting {path}"), err)),
                }
            }
        }
        Ok(())
    }
}
