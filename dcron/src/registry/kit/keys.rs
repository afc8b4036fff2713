//! The key layout every backend shares, and the check that keeps every name
//! one key segment.
//!
//! A namespace lives under one base (`/ns` in etcd and ZooKeeper, `ns` below
//! Consul's KV prefix; Redis keeps the same four kinds as hashes of one
//! hash-tagged namespace): `nodes/<id>`, `tasks/<name>`, `deleted/<name>`
//! (tombstones) and `claims/<name>`. See `docs/design.md` for each
//! backend's layout.

#[cfg(test)]
use crate::error::Error;
use crate::error::Result;
use crate::task::{validate_name, validate_task_name};

/// What a stored key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// A node record (bound to the node's liveness).
    Node,
    /// A dynamic task definition.
    Task,
    /// A tombstone: the task is marked deleted.
    Tombstone,
    /// A claim watermark.
    Claim,
}

impl Kind {
    /// The directory of this kind below the namespace.
    pub(crate) const fn dir(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Task => "tasks",
            Kind::Tombstone => "deleted",
            Kind::Claim => "claims",
        }
    }

    /// What a name of this kind is called in errors.
    const fn what(self) -> &'static str {
        match self {
            Kind::Node => "node id",
            _ => "task name",
        }
    }
}

/// Checks that `name` can be one key segment: the task-name alphabet
/// (1–200 characters of `[A-Za-z0-9._:@-]`, not `.` or `..`), which needs no
/// escaping in any backend. Task names fail with
/// [`Error::InvalidTaskName`]; namespaces and node ids, which come from
/// configuration, with [`Error::InvalidConfig`].
pub(crate) fn check_segment(what: &str, name: &str) -> Result<()> {
    match what {
        "task name" => validate_task_name(name),
        _ => validate_name(what, name),
    }
}

/// The keys of one namespace below a backend's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    base: String,
}

impl Layout {
    /// The layout of namespace `ns` below `root` (`"/"` for etcd and
    /// ZooKeeper, the KV prefix for Consul; empty or ending in `/`).
    pub(crate) fn new(root: &str, ns: &str) -> Result<Layout> {
        check_segment("namespace", ns)?;
        Ok(Layout {
            base: format!("{root}{ns}"),
        })
    }

    /// The namespace's own key (`/ns`).
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// The directory of `kind` (`/ns/tasks`).
    pub(crate) fn dir(&self, kind: Kind) -> String {
        format!("{}/{}", self.base, kind.dir())
    }

    /// The prefix of every key of `kind` (`/ns/tasks/`).
    pub(crate) fn prefix(&self, kind: Kind) -> String {
        format!("{}/{}/", self.base, kind.dir())
    }

    /// The key of `name` of `kind` (`/ns/tasks/backup`), checked to be one
    /// segment.
    pub(crate) fn key(&self, kind: Kind, name: &str) -> Result<String> {
        check_segment(kind.what(), name)?;
        Ok(format!("{}/{}/{name}", self.base, kind.dir()))
    }

    /// The name in `key` if it is exactly one segment below `kind`'s
    /// directory (the directory itself, deeper keys and other kinds are
    /// not names).
    pub(crate) fn name_of<'a>(&self, kind: Kind, key: &'a str) -> Option<&'a str> {
        let name = key
            .strip_prefix(self.base.as_str())?
            .strip_prefix('/')?
            .strip_prefix(kind.dir())?
            .strip_prefix('/')?;
        (!name.is_empty() && !name.contains('/')).then_some(name)
    }

    /// The kind and name of `key`, for keys one segment below one of the
    /// four directories.
    pub(crate) fn parse<'a>(&self, key: &'a str) -> Option<(Kind, &'a str)> {
        [Kind::Node, Kind::Task, Kind::Tombstone, Kind::Claim]
            .into_iter()
            .find_map(|kind| self.name_of(kind, key).map(|name| (kind, name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_names_round_trip() {
        let l = Layout::new("/", "ns").expect("valid");
        assert_eq!(l.base(), "/ns");
        assert_eq!(l.dir(Kind::Tombstone), "/ns/deleted");
        assert_eq!(l.prefix(Kind::Claim), "/ns/claims/");
        let key = l.key(Kind::Task, "backup").expect("valid");
        assert_eq!(key, "/ns/tasks/backup");
        assert_eq!(l.parse(&key), Some((Kind::Task, "backup")));
        assert_eq!(l.name_of(Kind::Node, &key), None);
        for not_a_name in [
            "/ns/tasks",
            "/ns/tasks/",
            "/ns/tasks/a/b",
            "/ns2/tasks/a",
            "/nsx/tasks/a",
        ] {
            assert_eq!(l.parse(not_a_name), None, "{not_a_name}");
        }
        let consul = Layout::new("dcron/", "ns").expect("valid");
        assert_eq!(
            consul.key(Kind::Node, "n1").expect("valid"),
            "dcron/ns/nodes/n1"
        );
    }

    #[test]
    fn names_must_be_one_segment() {
        let l = Layout::new("/", "ns").expect("valid");
        for bad in ["", ".", "..", "a/b", "a b", "ä"] {
            assert!(
                matches!(l.key(Kind::Task, bad), Err(Error::InvalidTaskName { .. })),
                "{bad:?}"
            );
            assert!(
                matches!(l.key(Kind::Node, bad), Err(Error::InvalidConfig(_))),
                "{bad:?}"
            );
            assert!(
                matches!(Layout::new("/", bad), Err(Error::InvalidConfig(_))),
                "{bad:?}"
            );
        }
    }
}
