//! `--registry URL`: parsing, secrets from the environment, connecting.
//!
//! | URL | backend |
//! |---|---|
//! | `redis://[user[:password]@]host[:port][/db]`, `rediss://...`, `redis+unix:///path.sock` | Redis |
//! | `etcd://[user@]host:port[,host:port...]` | etcd v3 |
//! | `zk://[user@]host:port[,host:port...][/chroot]` | ZooKeeper |
//! | `consul://host:port[?dc=DC]`, `consul+https://host:port[?dc=DC]` | Consul |
//!
//! Secrets come from environment variables (see [`SECRET_VARS`]) and are
//! never printed: every message shows the URL through [`redact`].

use std::sync::Arc;
use std::time::Duration;

use dcron::Registry;

use crate::error::{CliError, CliResult};

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

const SCHEMES: &str = "redis://, rediss://, etcd://, zk://, consul:// or consul+https://";

/// A parsed `--registry` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Redis URL, passed to the Redis client as is (plus credentials
    /// from the environment).
    Redis { url: String },
    /// etcd members as `http://host:port`, and the user name if the URL
    /// has one.
    Etcd {
        endpoints: Vec<String>,
        user: Option<String>,
    },
    /// A ZooKeeper connect string `host:port,...[/chroot]`, and the digest
    /// user name if the URL has one.
    Zookeeper {
        connect: String,
        user: Option<String>,
    },
    /// The Consul agent's base URL and the datacenter (`?dc=`).
    Consul {
        address: String,
        datacenter: Option<String>,
    },
}

impl Target {
    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        match self {
            Target::Redis { .. } => "redis",
            Target::Etcd { .. } => "etcd",
            Target::Zookeeper { .. } => "zookeeper",
            Target::Consul { .. } => "consul",
        }
    }
}

/// Options that depend on the caller (an agent tunes the ZooKeeper session).
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectOptions {
    /// The node TTL an agent asked for; ZooKeeper's session timeout is the
    /// node TTL, so it is asked for when the session opens.
    pub node_ttl: Option<Duration>,
}

/// `url` with any password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let shown = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => userinfo.to_string(),
            };
            format!("{scheme}://{shown}{}", &rest[at..])
        }
        None => url.to_string(),
    }
}

/// Parses a registry URL (without touching the network or the environment).
pub fn parse(raw: &str) -> CliResult<Target> {
    let raw = raw.trim();
    let shown = redact(raw);
    let Some((scheme, rest)) = raw.split_once("://") else {
        return Err(CliError::invalid(format!(
            "registry `{shown}` is not a URL; use {SCHEMES}"
        )));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "redis" | "rediss" => parse_redis(raw, &shown),
        "redis+unix" | "unix" => Ok(Target::Redis {
            url: raw.to_string(),
        }),
        "etcd" | "etcd+http" => parse_etcd(rest, &shown),
        "etcd+https" => Err(CliError::invalid(format!(
            "registry `{shown}`: etcd over TLS is not supported by this dcron; use etcd:// (plain HTTP/2) behind a private network"
        ))),
        "zk" | "zookeeper" => parse_zk(rest, &shown),
        "consul" | "consul+http" => parse_consul(rest, "http", &shown),
        "consul+https" => parse_consul(rest, "https", &shown),
        "memory" | "mem" => Err(CliError::invalid(
            "the memory registry lives inside one process, so the `dcron` command cannot share it with \
             agents or other commands; use a shared registry: redis://, etcd://, zk:// or consul://",
        )),
        other => Err(CliError::invalid(format!(
            "registry `{shown}`: unknown scheme `{other}://`; use {SCHEMES}"
        ))),
    }
}

fn parse_redis(raw: &str, shown: &str) -> CliResult<Target> {
    let url = url::Url::parse(raw).map_err(|e| {
        CliError::invalid(format!("registry `{shown}` is not a valid Redis URL: {e}"))
    })?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(CliError::invalid(format!(
            "registry `{shown}` has no host; use e.g. redis://127.0.0.1:6379"
        )));
    }
    let db = url.path().trim_matches('/');
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err(CliError::invalid(format!(
            "registry `{shown}`: the path must be a database number (redis://host:6379/0), not `/{db}`"
        )));
    }
    Ok(Target::Redis {
        url: raw.to_string(),
    })
}

/// Splits `user@rest`; a password in the URL is refused (it belongs in an
/// environment variable).
fn split_user(rest: &str, shown: &str, password_var: &str) -> CliResult<(Option<String>, String)> {
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        None => Ok((None, rest.to_string())),
        Some(at) => {
            let userinfo = &rest[..at];
            if userinfo.contains(':') {
                return Err(CliError::invalid(format!(
                    "registry `{shown}`: do not put the password in the URL; set {password_var} instead"
                )));
            }
            if userinfo.is_empty() {
                return Err(CliError::invalid(format!(
                    "registry `{shown}`: empty user name before `@`"
                )));
            }
            Ok((Some(userinfo.to_string()), rest[at + 1..].to_string()))
        }
    }
}

/// Checks `host[:port]` (IPv6 in brackets) and adds `default_port`.
fn host_port(item: &str, default_port: u16, shown: &str) -> CliResult<String> {
    let bad = |why: &str| CliError::invalid(format!("registry `{shown}`: `{item}` {why}"));
    let item = item.trim();
    if item.is_empty() {
        return Err(bad("is an empty host"));
    }
    let (host, port) = if let Some(rest) = item.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("has an unclosed `[`"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("is not host:port"))?),
        };
        (format!("[{host}]"), port)
    } else {
        match item.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (item.to_string(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(bad("has no host"));
    }
    if host.contains(['/', '@', '?', '#', ' ']) {
        return Err(bad("is not a host name"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("has an invalid port"))?,
    };
    Ok(format!("{host}:{port}"))
}

fn no_query(rest: &str, shown: &str) -> CliResult<()> {
    if rest.contains(['?', '#']) {
        return Err(CliError::invalid(format!(
            "registry `{shown}`: query parameters are not supported here"
        )));
    }
    Ok(())
}

fn parse_etcd(rest: &str, shown: &str) -> CliResult<Target> {
    let (user, rest) = split_user(rest, shown, "DCRON_ETCD_PASSWORD")?;
    no_query(&rest, shown)?;
    let hosts = rest.trim_end_matches('/');
    if hosts.contains('/') {
        return Err(CliError::invalid(format!(
            "registry `{shown}`: etcd URLs have no path; use etcd://host:port[,host:port]"
        )));
    }
    let endpoints = hosts
        .split(',')
        .map(|h| host_port(h, 2379, shown).map(|hp| format!("http://{hp}")))
        .collect::<CliResult<Vec<_>>>()?;
    Ok(Target::Etcd { endpoints, user })
}

fn parse_zk(rest: &str, shown: &str) -> CliResult<Target> {
    let (user, rest) = split_user(rest, shown, "DCRON_ZK_PASSWORD")?;
    no_query(&rest, shown)?;
    let (hosts, chroot) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest.as_str(), ""),
    };
    let hosts = hosts
        .split(',')
        .map(|h| host_port(h, 2181, shown))
        .collect::<CliResult<Vec<_>>>()?;
    if chroot.contains("//") || chroot.split('/').any(|s| s == "." || s == "..") {
        return Err(CliError::invalid(format!(
            "registry `{shown}`: invalid chroot `{chroot}`"
        )));
    }
    Ok(Target::Zookeeper {
        connect: format!("{}{chroot}", hosts.join(",")),
        user,
    })
}

fn parse_consul(rest: &str, http: &str, shown: &str) -> CliResult<Target> {
    if rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())].contains('@') {
        return Err(CliError::invalid(format!(
            "registry `{shown}`: do not put credentials in the URL; set DCRON_CONSUL_TOKEN (or CONSUL_HTTP_TOKEN) to the ACL token"
        )));
    }
    if rest.contains('#') {
        return Err(CliError::invalid(format!(
            "registry `{shown}`: a fragment (`#`) is not allowed"
        )));
    }
    let (base, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match base.find('/') {
        Some(i) => (&base[..i], base[i..].trim_end_matches('/')),
        None => (base, ""),
    };
    if authority.contains(',') {
        return Err(CliError::invalid(format!(
            "registry `{shown}`: Consul takes one agent address (the local agent forwards to the servers)"
        )));
    }
    let hp = host_port(authority, 8500, shown)?;
    let mut datacenter = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("dc", dc)) if !dc.is_empty() => datacenter = Some(dc.to_string()),
            _ => {
                return Err(CliError::invalid(format!(
                    "registry `{shown}`: unknown query parameter `{pair}`; only `dc=DATACENTER` is supported"
                )))
            }
        }
    }
    Ok(Target::Consul {
        address: format!("{http}://{hp}{path}"),
        datacenter,
    })
}

/// Reads a secret variable (unset or empty = absent).
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Whether the target needs TLS.
fn needs_tls(target: &Target) -> bool {
    match target {
        Target::Redis { url } => url
            .get(..9)
            .is_some_and(|s| s.eq_ignore_ascii_case("rediss://")),
        Target::Consul { address, .. } => address.starts_with("https://"),
        _ => false,
    }
}

/// Connects to `target`, with secrets from the environment.
pub async fn connect(target: &Target, opts: ConnectOptions) -> CliResult<Arc<dyn Registry>> {
    if needs_tls(target) && !cfg!(feature = "tls") {
        return Err(CliError::invalid(format!(
            "{} over TLS needs a dcron built with the `tls` feature (cargo install dcron-cli --features tls)",
            target.backend()
        )));
    }
    connect_with_env(target, opts, &env_var).await
}

#[allow(unused_variables)]
async fn connect_with_env(
    target: &Target,
    opts: ConnectOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> CliResult<Arc<dyn Registry>> {
    match target {
        Target::Redis { url } => {
            #[cfg(feature = "redis")]
            {
                let url = redis_url_with_secrets(url, env)?;
                let registry = dcron::registry::RedisRegistry::connect(&url).await?;
                Ok(Arc::new(registry))
            }
            #[cfg(not(feature = "redis"))]
            Err(missing_feature("redis"))
        }
        Target::Etcd { endpoints, user } => {
            #[cfg(feature = "etcd")]
            {
                let mut builder = dcron::registry::EtcdRegistry::builder(endpoints);
                let user = user.clone().or_else(|| env("DCRON_ETCD_USER"));
                match (user, env("DCRON_ETCD_PASSWORD")) {
                    (Some(user), Some(password)) => builder = builder.user(user, password),
                    (Some(user), None) => {
                        return Err(CliError::invalid(format!(
                            "etcd user `{user}` given but DCRON_ETCD_PASSWORD is not set"
                        )))
                    }
                    (None, Some(_)) => {
                        return Err(CliError::invalid(
                            "DCRON_ETCD_PASSWORD is set but no user: set DCRON_ETCD_USER or use etcd://USER@host:port",
                        ))
                    }
                    (None, None) => {}
                }
                Ok(Arc::new(builder.connect().await?))
            }
            #[cfg(not(feature = "etcd"))]
            Err(missing_feature("etcd"))
        }
        Target::Zookeeper { connect, user } => {
            #[cfg(feature = "zookeeper")]
            {
                let mut builder =
                    dcron::registry::zookeeper::ZookeeperBuilder::new(connect.clone());
                if let Some(ttl) = opts.node_ttl {
                    builder = builder.session_timeout(ttl);
                }
                let user = user.clone().or_else(|| env("DCRON_ZK_USER"));
                match (user, env("DCRON_ZK_PASSWORD")) {
                    (Some(user), Some(password)) => builder = builder.digest_auth(user, password),
                    (Some(user), None) => {
                        return Err(CliError::invalid(format!(
                            "ZooKeeper user `{user}` given but DCRON_ZK_PASSWORD is not set"
                        )))
                    }
                    (None, Some(_)) => {
                        return Err(CliError::invalid(
                            "DCRON_ZK_PASSWORD is set but no user: set DCRON_ZK_USER or use zk://USER@host:port",
                        ))
                    }
                    (None, None) => {}
                }
                Ok(Arc::new(builder.connect().await?))
            }
            #[cfg(not(feature = "zookeeper"))]
            Err(missing_feature("zookeeper"))
        }
        Target::Consul {
            address,
            datacenter,
        } => {
            #[cfg(feature = "consul")]
            {
                let mut builder = dcron::registry::ConsulRegistry::builder(address);
                if let Some(token) = env("DCRON_CONSUL_TOKEN").or_else(|| env("CONSUL_HTTP_TOKEN"))
                {
                    builder = builder.token(token);
                }
                if let Some(dc) = datacenter {
                    builder = builder.datacenter(dc.clone());
                }
                Ok(Arc::new(builder.connect().await?))
            }
            #[cfg(not(feature = "consul"))]
            Err(missing_feature("consul"))
        }
    }
}

#[allow(dead_code)]
fn missing_feature(backend: &str) -> CliError {
    CliError::invalid(format!(
        "this dcron was built without the `{backend}` backend; rebuild it with `--features {backend}`"
    ))
}

/// The Redis URL with `DCRON_REDIS_USERNAME` / `DCRON_REDIS_PASSWORD`
/// filled in (they override credentials in the URL).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
fn redis_url_with_secrets(raw: &str, env: &dyn Fn(&str) -> Option<String>) -> CliResult<String> {
    let user = env("DCRON_REDIS_USERNAME");
    let password = env("DCRON_REDIS_PASSWORD");
    if user.is_none() && password.is_none() {
        return Ok(raw.to_string());
    }
    let shown = redact(raw);
    let mut url = url::Url::parse(raw).map_err(|e| {
        CliError::invalid(format!("registry `{shown}` is not a valid Redis URL: {e}"))
    })?;
    let cannot = || CliError::invalid(format!("registry `{shown}` cannot carry credentials"));
    if let Some(user) = user {
        url.set_username(&user).map_err(|_| cannot())?;
    }
    if let Some(password) = password {
        url.set_password(Some(&password)).map_err(|_| cannot())?;
    }
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls() {
        assert_eq!(
            parse("redis://127.0.0.1:6379/2").unwrap(),
            Target::Redis {
                url: "redis://127.0.0.1:6379/2".into()
            }
        );
        assert!(parse("rediss://:pw@cache.example:6380").is_ok());
        assert!(parse("redis://127.0.0.1/notanumber").is_err());
        assert!(parse("redis://").is_err());
        assert!(parse("redis+unix:///run/redis.sock").is_ok());
        assert!(needs_tls(&parse("rediss://h:1").unwrap()));
        assert!(needs_tls(&parse("consul+https://h:1").unwrap()));
        assert!(!needs_tls(&parse("redis://h:1").unwrap()));
    }

    #[test]
    fn etcd_urls() {
        assert_eq!(
            parse("etcd://a:2379,b:2380,[::1]:1").unwrap(),
            Target::Etcd {
                endpoints: vec![
                    "http://a:2379".into(),
                    "http://b:2380".into(),
                    "http://[::1]:1".into()
                ],
                user: None
            }
        );
        assert_eq!(
            parse("etcd://root@a").unwrap(),
            Target::Etcd {
                endpoints: vec!["http://a:2379".into()],
                user: Some("root".into())
            }
        );
        let err = parse("etcd://root:secret@a:2379").unwrap_err();
        assert!(err.message.contains("DCRON_ETCD_PASSWORD"), "{err}");
        assert!(!err.message.contains("secret"), "password echoed: {err}");
        assert!(parse("etcd://a:99999").is_err());
        assert!(parse("etcd://a:1,").is_err());
        assert!(parse("etcd://a:1/x").is_err());
    }

    #[test]
    fn zk_urls() {
        assert_eq!(
            parse("zk://z1:2181,z2/dcron/prod/").unwrap(),
            Target::Zookeeper {
                connect: "z1:2181,z2:2181/dcron/prod".into(),
                user: None
            }
        );
        assert_eq!(
            parse("zk://z1").unwrap(),
            Target::Zookeeper {
                connect: "z1:2181".into(),
                user: None
            }
        );
        assert!(parse("zk://z1/a//b").is_err());
    }

    #[test]
    fn consul_urls() {
        assert_eq!(
            parse("consul://127.0.0.1:8500").unwrap(),
            Target::Consul {
                address: "http://127.0.0.1:8500".into(),
                datacenter: None
            }
        );
        assert_eq!(
            parse("consul+https://consul.example?dc=eu1").unwrap(),
            Target::Consul {
                address: "https://consul.example:8500".into(),
                datacenter: Some("eu1".into())
            }
        );
        assert!(parse("consul://tok@host:8500").is_err());
        assert!(parse("consul://a:1,b:2").is_err());
        assert!(parse("consul://a:1?token=x").is_err());
    }

    #[test]
    fn other_schemes_are_refused() {
        let err = parse("memory://").unwrap_err();
        assert!(err.message.contains("cannot share"), "{err}");
        assert!(parse("mysql://x")
            .unwrap_err()
            .message
            .contains("unknown scheme"));
        assert!(parse("localhost:6379").is_err());
        assert!(parse("etcd+https://a:1").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:pw@h"), "redis://u:***@h");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(redact("etcd://u@h"), "etcd://u@h");
        let err = parse("redis://:hunter2@h/zz").unwrap_err();
        assert!(!err.message.contains("hunter2"), "{err}");
    }

    #[test]
    fn redis_secrets_from_env() {
        let env = |k: &str| match k {
            "DCRON_REDIS_PASSWORD" => Some("p@ss word".to_string()),
            _ => None,
        };
        let url = redis_url_with_secrets("redis://127.0.0.1:6379/1", &env).unwrap();
        assert_eq!(url, "redis://:p%40ss%20word@127.0.0.1:6379/1");
        let none = |_: &str| None;
        assert_eq!(
            redis_url_with_secrets("redis://h:1", &none).unwrap(),
            "redis://h:1"
        );
    }
}
