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

/// The `connect_timeout` and `request_timeout` setters every backend's
/// builder has, on its `options: Options` field; each backend documents
/// its own defaults.
macro_rules! timeout_setters {
    (connect: $connect:expr, request: $request:expr $(,)?) => {
        #[doc = $connect]
        pub fn connect_timeout(mut self, timeout: std::time::Duration) -> Self {
            self.options.connect_timeout = timeout;
            self
        }

        #[doc = $request]
        pub fn request_timeout(mut self, timeout: std::time::Duration) -> Self {
            self.options.request_timeout = timeout;
            self
        }
    };
}
pub(crate) use timeout_setters;

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
