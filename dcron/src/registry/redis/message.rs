//! The change messages every write script publishes on the events channel:
//! `<kind> <name>`, or `resync` after a bulk change.

use crate::registry::kit::keys::check_segment;
use crate::registry::WatchEvent;

/// A parsed message, before the value of a put is fetched.
#[derive(Debug)]
pub(super) enum Pending {
    /// Complete as it is.
    Ready(WatchEvent),
    /// A task was put: its definition is read from the tasks hash.
    Task(String),
    /// A node was put: its record is read from its key.
    Node(String),
}

/// The message in `payload`, or `None` if it is not one dcron publishes.
pub(super) fn parse(payload: &[u8]) -> Option<Pending> {
    let text = std::str::from_utf8(payload).ok()?;
    if text == "resync" {
        return Some(Pending::Ready(WatchEvent::Resync));
    }
    let (kind, name) = text.split_once(' ')?;
    // Node ids and task names share the alphabet of a key segment.
    check_segment("task name", name).ok()?;
    let name = name.to_string();
    Some(match kind {
        "task-put" => Pending::Task(name),
        "node-put" => Pending::Node(name),
        "task-delete" => Pending::Ready(WatchEvent::TaskDelete(name)),
        "node-delete" => Pending::Ready(WatchEvent::NodeDelete(name)),
        "tombstone-put" => Pending::Ready(WatchEvent::TombstonePut(name)),
        "tombstone-delete" => Pending::Ready(WatchEvent::TombstoneDelete(name)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse() {
        assert!(matches!(
            parse(b"task-put job-1"),
            Some(Pending::Task(n)) if n == "job-1"
        ));
        assert!(matches!(
            parse(b"node-delete n:1"),
            Some(Pending::Ready(WatchEvent::NodeDelete(n))) if n == "n:1"
        ));
        assert!(matches!(
            parse(b"resync"),
            Some(Pending::Ready(WatchEvent::Resync))
        ));
        for bad in [
            &b"task-put"[..],
            b"task-put ",
            b"task-put a/b",
            b"bogus x",
            b"\xff\xfe",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }
}
