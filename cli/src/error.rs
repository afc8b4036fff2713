//! The command's error type and exit codes.

use std::fmt;

/// Exit code: the registry or the system failed (unreachable, timeout, I/O).
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: invalid input (usage, task name, cron, payload, config file).
pub const EXIT_INVALID: i32 = 2;
/// Exit code: the registry refused the change (task exists / is deleted).
pub const EXIT_CONFLICT: i32 = 3;
/// Exit code of an agent forced to exit by a second signal.
pub const EXIT_FORCED: i32 = 130;

/// An error to print (`error: ...`) before exiting with `code`.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    /// Invalid input: exit code 2.
    pub fn invalid(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_INVALID,
            message: message.into(),
        }
    }

    /// Runtime failure: exit code 1.
    pub fn failure(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_FAILURE,
            message: message.into(),
        }
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<dcron::Error> for CliError {
    fn from(err: dcron::Error) -> Self {
        use dcron::Error as E;
        let code = match &err {
            E::InvalidCron { .. }
            | E::InvalidTaskName { .. }
            | E::PayloadTooLarge { .. }
            | E::InvalidConfig(_) => EXIT_INVALID,
            E::TaskExists(_) | E::TaskDeleted(_) => EXIT_CONFLICT,
            _ => EXIT_FAILURE,
        };
        let message = match &err {
            // The library's messages name its API; say it in terms of the command.
            E::TaskExists(name) => {
                format!("task `{name}` already exists; use `dcron add --force` to overwrite it")
            }
            E::TaskDeleted(name) => format!(
                "task `{name}` is marked deleted; run `dcron reuse {name}` to revive it, or `dcron add --force` to replace it"
            ),
            _ => error_chain(&err),
        };
        CliError { code, message }
    }
}

/// `err: cause: cause ...`, skipping causes already quoted by their parent.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !cause_text.is_empty() && !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `Result` with [`CliError`].
pub type CliResult<T> = Result<T, CliError>;
