//! SIGINT / SIGTERM / SIGHUP handling.
//!
//! All three mean "stop": a daemon that loses its terminal (SIGHUP) or is
//! told to stop by its supervisor (SIGTERM) or by an operator (SIGINT)
//! stops the same graceful way. SIGHUP is deliberately *not* a config
//! reload for `dcron agent`: most of its settings (registry, namespace,
//! node id, strategy, weight, TTLs) can only change by leaving the cluster
//! and joining again, which is a restart, and a half-applied reload is
//! worse than none. Restart the agent to load a changed config.

use crate::error::{CliError, CliResult};

/// The name [`Signals::recv`] returns for SIGHUP. A hangup often comes
/// twice (the shell forwards it to its jobs, then the kernel sends it to
/// the foreground group when the shell exits), so a caller that escalates
/// on a second signal should not count a repeated hangup.
pub const HANGUP: &str = "SIGHUP";

/// A stream of termination signals (SIGINT, SIGTERM and SIGHUP on Unix,
/// Ctrl-C elsewhere). Create it early: once created, the signals no longer
/// kill the process by default.
pub struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn new() -> CliResult<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let install = |kind: SignalKind, name: &str| {
                signal(kind).map_err(|e| {
                    CliError::failure(format!("cannot install the {name} handler: {e}"))
                })
            };
            Ok(Signals {
                int: install(SignalKind::interrupt(), "SIGINT")?,
                term: install(SignalKind::terminate(), "SIGTERM")?,
                hup: install(SignalKind::hangup(), "SIGHUP")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    /// Waits for the next signal and returns its name.
    pub async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.int.recv() => "SIGINT",
                _ = self.term.recv() => "SIGTERM",
                _ = self.hup.recv() => HANGUP,
            }
        }
        #[cfg(not(unix))]
        {
            match tokio::signal::ctrl_c().await {
                Ok(()) => "Ctrl-C",
                Err(_) => std::future::pending().await,
            }
        }
    }
}

/// Resolves on the first SIGINT / SIGTERM / SIGHUP.
pub async fn shutdown() {
    match Signals::new() {
        Ok(mut signals) => {
            signals.recv().await;
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
