//! Options every backend's builder takes, and secrets that never print.

use std::fmt;
use std::time::Duration;

use crate::registry::Timing;

/// Bounds and timing shared by every backend's builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Options {
    /// Bound on establishing a connection (or session).
    pub connect_timeout: Duration,
    /// Bound on one registry call, retries included.
    pub request_timeout: Duration,
    /// Timing defaults the backend suggests to nodes.
    pub timing: Timing,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            timing: Timing::default(),
        }
    }
}

/// A password or token: usable by the backend, printed as `***` by
/// `Debug` and `Display`, so a builder or registry can be logged whole.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub(crate) fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the wire only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Builder {
            password: Option<Secret>,
        }
        let shown = format!("{:?}", Builder { password: Some(s) });
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
