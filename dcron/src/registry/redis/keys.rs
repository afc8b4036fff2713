//! The keys of one namespace: every one carries the hash tag `{ns}`, so a
//! Redis Cluster keeps a namespace in one slot and a script may touch all
//! of them (the table is in the [module docs](super)).

use redis::{Script, ScriptInvocation};

use crate::error::Result;
use crate::registry::kit::keys::check_segment;

/// The keys and the events channel of one namespace.
pub(super) struct Keys {
    pub nodes: String,
    pub node_prefix: String,
    pub tasks: String,
    pub deleted: String,
    pub claims: String,
    pub events: String,
}

impl Keys {
    /// The keys of namespace `ns` in database `db`: pub/sub ignores
    /// databases, so the channel names the database unless it is 0.
    pub fn new(ns: &str, db: i64) -> Result<Self> {
        check_segment("namespace", ns)?;
        let events = if db == 0 {
            format!("{{{ns}}}:events")
        } else {
            format!("{{{ns}}}:events:db{db}")
        };
        Ok(Keys {
            nodes: format!("{{{ns}}}:nodes"),
            node_prefix: format!("{{{ns}}}:node:"),
            tasks: format!("{{{ns}}}:tasks"),
            deleted: format!("{{{ns}}}:deleted"),
            claims: format!("{{{ns}}}:claims"),
            events,
        })
    }

    /// The record key of node `id`.
    pub fn node(&self, id: &str) -> String {
        format!("{}{id}", self.node_prefix)
    }

    /// A node script with its common arguments (the node set, the record
    /// prefix, the channel); the caller adds its own.
    pub fn node_script<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(&self.nodes)
            .arg(&self.node_prefix)
            .arg(&self.events);
        inv
    }

    /// A node script about node `id`, which must be one key segment.
    pub fn for_node<'a>(&self, script: &'a Script, id: &str) -> Result<ScriptInvocation<'a>> {
        check_segment("node id", id)?;
        let mut inv = self.node_script(script);
        inv.arg(id);
        Ok(inv)
    }

    /// A script on field `name` of `hash`, after the channel; the name must
    /// be one key segment.
    pub fn for_field<'a>(
        &self,
        script: &'a Script,
        hash: &str,
        name: &str,
    ) -> Result<ScriptInvocation<'a>> {
        check_segment("task name", name)?;
        let mut inv = script.prepare_invoke();
        inv.key(hash).arg(&self.events).arg(name);
        Ok(inv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn keys_share_a_hash_tag() {
        let k = Keys::new("billing", 0).expect("valid");
        assert_eq!(k.nodes, "{billing}:nodes");
        assert_eq!(k.node_prefix, "{billing}:node:");
        assert_eq!(k.node("n1"), "{billing}:node:n1");
        assert_eq!(k.tasks, "{billing}:tasks");
        assert_eq!(k.deleted, "{billing}:deleted");
        assert_eq!(k.claims, "{billing}:claims");
        assert_eq!(k.events, "{billing}:events");
        let db3 = Keys::new("billing", 3).expect("valid");
        assert_eq!(db3.events, "{billing}:events:db3");
    }

    #[test]
    fn namespaces_are_one_segment() {
        for bad in ["", "a}b", "a b", ".."] {
            assert!(
                matches!(Keys::new(bad, 0), Err(Error::InvalidConfig(_))),
                "{bad:?}"
            );
        }
    }
}
