//! `--registry URL`: the library parses and connects
//! ([`dcron::registry::RegistryUrl`]); the command adds what is its own:
//! secrets come from environment variables (see [`SECRET_VARS`]), never
//! from the command line, and every message shows the URL redacted.

use std::sync::Arc;
use std::time::Duration;

use dcron::registry::RegistryUrl;
use dcron::Registry;

use crate::error::{CliError, CliResult};

pub use dcron::registry::redact;

/// Environment variables holding secrets. They are read by the command and
/// removed from the environment of the commands an agent runs.
pub const SECRET_VARS: &[&str] = &[
    "DCRON_REGISTRY",
    "DCRON_REDIS_USERNAME",
    "DCRON_REDIS_PASSWORD",
    "DCRON_ETCD_USER",
    "DCRON_ETCD_PASSWORD",
    "DCRON_ZK_USER",
    "DCRON_ZK_PASSWORD",
    "DCRON_CONSUL_TOKEN",
    "CONSUL_HTTP_TOKEN",
];

/// Options that depend on the caller (an agent tunes the ZooKeeper session).
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectOptions {
    /// The node TTL an agent asked for; ZooKeeper's session timeout is the
    /// node TTL, so it is asked for when the session opens.
    pub node_ttl: Option<Duration>,
}

/// Parses a registry URL (without touching the network or the environment),
/// refusing what a command line must not carry.
pub fn parse(raw: &str) -> CliResult<RegistryUrl> {
    let url = RegistryUrl::parse(raw)?;
    match url.backend() {
        "memory" => Err(CliError::invalid(
            "the memory registry lives inside one process, so the `dcron` command cannot share it with \
             agents or other commands; use a shared registry: redis://, etcd://, zk:// or consul://",
        )),
        // A command line is visible to every user of the host.
        backend @ ("etcd" | "zookeeper") if url.has_password() => Err(CliError::invalid(format!(
            "registry `{url}`: do not put the password in the URL; set {} instead",
            password_var(backend)
        ))),
        _ => Ok(url),
    }
}

fn password_var(backend: &str) -> &'static str {
    match backend {
        "etcd" => "DCRON_ETCD_PASSWORD",
        _ => "DCRON_ZK_PASSWORD",
    }
}

/// Reads a secret variable (unset or empty = absent).
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Connects to `url`, with secrets from the environment.
pub async fn connect(url: &RegistryUrl, opts: ConnectOptions) -> CliResult<Arc<dyn Registry>> {
    if url.uses_tls() && !cfg!(feature = "tls") {
        return Err(CliError::invalid(format!(
            "{} over TLS needs a dcron built with the `tls` feature (cargo install dcron-cli --features tls)",
            url.backend()
        )));
    }
    let mut url = with_secrets(url.clone(), &env_var)?;
    if let Some(ttl) = opts.node_ttl {
        url = url.node_ttl(ttl);
    }
    Ok(url.connect().await?)
}

/// `url` with the credentials the environment holds for its backend.
fn with_secrets(url: RegistryUrl, env: &dyn Fn(&str) -> Option<String>) -> CliResult<RegistryUrl> {
    let url = match url.backend() {
        "redis" => {
            let mut url = url;
            if let Some(user) = env("DCRON_REDIS_USERNAME") {
                url = url.user(user);
            }
            if let Some(password) = env("DCRON_REDIS_PASSWORD") {
                url = url.password(password);
            }
            url
        }
        backend @ ("etcd" | "zookeeper") => {
            let (user_var, scheme, name) = match backend {
                "etcd" => ("DCRON_ETCD_USER", "etcd", "etcd"),
                _ => ("DCRON_ZK_USER", "zk", "ZooKeeper"),
            };
            let password_var = password_var(backend);
            let user = url
                .user_name()
                .map(str::to_string)
                .or_else(|| env(user_var));
            match (user, env(password_var)) {
                (Some(user), Some(password)) => url.user(user).password(password),
                (Some(user), None) => {
                    return Err(CliError::invalid(format!(
                        "{name} user `{user}` given but {password_var} is not set"
                    )))
                }
                (None, Some(_)) => {
                    return Err(CliError::invalid(format!(
                        "{password_var} is set but no user: set {user_var} or use {scheme}://USER@host:port"
                    )))
                }
                (None, None) => url,
            }
        }
        "consul" => match env("DCRON_CONSUL_TOKEN").or_else(|| env("CONSUL_HTTP_TOKEN")) {
            Some(token) => url.token(token),
            None => url,
        },
        _ => url,
    };
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_carry_no_passwords_and_no_memory_registry() {
        let err = parse("etcd://root:secret@a:2379").unwrap_err();
        assert!(err.message.contains("DCRON_ETCD_PASSWORD"), "{err}");
        assert!(!err.message.contains("secret"), "password echoed: {err}");
        let err = parse("zk://u:hunter2@z1").unwrap_err();
        assert!(err.message.contains("DCRON_ZK_PASSWORD"), "{err}");
        assert!(!err.message.contains("hunter2"), "password echoed: {err}");
        assert!(parse("memory://")
            .unwrap_err()
            .message
            .contains("cannot share"));
        assert!(parse("mysql://x")
            .unwrap_err()
            .message
            .contains("unknown scheme"));
        assert!(parse("etcd://root@a").is_ok());
        assert!(parse("redis://:pw@h:1/0").is_ok());
    }

    #[test]
    fn secrets_come_from_the_environment() {
        let env = |k: &str| match k {
            "DCRON_ETCD_PASSWORD" | "DCRON_CONSUL_TOKEN" => Some("s3cret".to_string()),
            _ => None,
        };
        let url = with_secrets(parse("etcd://root@a").unwrap(), &env).unwrap();
        assert!(url.has_password());
        assert!(!format!("{url} {url:?}").contains("s3cret"));
        let err = with_secrets(parse("etcd://a").unwrap(), &env).unwrap_err();
        assert!(err.message.contains("DCRON_ETCD_USER"), "{err}");
        let none = |_: &str| None;
        let err = with_secrets(parse("zk://u@z").unwrap(), &none).unwrap_err();
        assert!(
            err.message.contains("DCRON_ZK_PASSWORD is not set"),
            "{err}"
        );
        let url = with_secrets(parse("consul://c:8500").unwrap(), &env).unwrap();
        assert!(!format!("{url:?}").contains("s3cret"));
    }
}
