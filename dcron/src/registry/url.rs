//! Registry URLs: one string from configuration picks and reaches a backend.
//!
//! | URL | backend |
//! |---|---|
//! | `memory://` | a new in-process [`MemoryRegistry`] (one process only) |
//! | `redis://[user[:password]@]host[:port][/db]`, `rediss://...`, `redis+unix:///path.sock` | Redis |
//! | `etcd://[user[:password]@]host:port[,host:port...]` | etcd v3 |
//! | `zk://[user[:password]@]host:port[,host:port...][/chroot]` | ZooKeeper |
//! | `consul://host:port[?dc=DC]`, `consul+https://host:port[?dc=DC]` | Consul |
//!
//! Parsing touches neither the network nor the environment, and every
//! message shows the URL [`redact`]ed: a password never appears in an
//! error, a log line or `Debug` output. Credentials that do not belong in
//! the URL (a Consul ACL token, a password kept in a secret store) are
//! added with [`RegistryUrl::user`], [`RegistryUrl::password`] and
//! [`RegistryUrl::token`].
//!
//! ```
//! # async fn demo() -> dcron::Result<()> {
//! // Straight from configuration:
//! let registry = dcron::registry::connect("memory://").await?;
//! assert_eq!(registry.backend(), "memory");
//!
//! // With a secret kept out of the configuration file:
//! let url: dcron::registry::RegistryUrl = "consul://127.0.0.1:8500?dc=eu1".parse()?;
//! let url = url.token("from-a-secret-store");
//! assert_eq!(url.to_string(), "consul://127.0.0.1:8500?dc=eu1");
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::registry::kit::options::Secret;
use crate::registry::{MemoryRegistry, Registry};

const SCHEMES: &str =
    "memory://, redis://, rediss://, etcd://, zk://, consul:// or consul+https://";

/// Connects to the registry at `url` with the backend's defaults.
///
/// `Error::InvalidConfig` for a URL that cannot be used (naming a backend
/// this build lacks, too); the backend's own error when it cannot be
/// reached.
pub async fn connect(url: &str) -> Result<Arc<dyn Registry>> {
    url.parse::<RegistryUrl>()?.connect().await
}

/// A parsed registry URL (see the [module docs](self)); shown redacted.
#[derive(Clone)]
pub struct RegistryUrl {
    endpoint: Endpoint,
    /// The URL as given, redacted: what messages show.
    shown: String,
    user: Option<String>,
    password: Option<Secret>,
    token: Option<Secret>,
    node_ttl: Option<Duration>,
}

/// Where the registry is, per backend.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Memory,
    /// Passed to the Redis client as it is (it parses credentials and db).
    Redis(String),
    /// Members as `http://host:port`.
    Etcd(Vec<String>),
    /// A connect string `host:port,...[/chroot]`.
    Zookeeper(String),
    /// The agent's base URL and the datacenter.
    Consul {
        address: String,
        datacenter: Option<String>,
    },
}

impl FromStr for RegistryUrl {
    type Err = Error;

    fn from_str(raw: &str) -> Result<RegistryUrl> {
        RegistryUrl::parse(raw)
    }
}

impl fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryUrl")
            .field("url", &self.shown)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("node_ttl", &self.node_ttl)
            .finish()
    }
}

impl RegistryUrl {
    /// Parses `raw` (see the [module docs](self) for the forms).
    pub fn parse(raw: &str) -> Result<RegistryUrl> {
        let raw = raw.trim();
        let shown = redact(raw);
        let Some((scheme, rest)) = raw.split_once("://") else {
            return Err(invalid(format!(
                "registry `{shown}` is not a URL; use {SCHEMES}"
            )));
        };
        let mut url = RegistryUrl {
            endpoint: Endpoint::Memory,
            shown: shown.clone(),
            user: None,
            password: None,
            token: None,
            node_ttl: None,
        };
        url.endpoint = match scheme.to_ascii_lowercase().as_str() {
            "memory" | "mem" => {
                if !rest.trim_end_matches('/').is_empty() {
                    return Err(invalid(format!(
                        "registry `{shown}`: the memory registry takes no address; use memory://"
                    )));
                }
                Endpoint::Memory
            }
            "redis" | "rediss" => {
                check_redis(rest, &shown)?;
                Endpoint::Redis(raw.to_string())
            }
            "redis+unix" | "unix" => Endpoint::Redis(raw.to_string()),
            "etcd" | "etcd+http" => {
                let rest = url.take_userinfo(rest, &shown)?;
                Endpoint::Etcd(parse_etcd(&rest, &shown)?)
            }
            "etcd+https" => {
                return Err(invalid(format!(
                    "registry `{shown}`: etcd over TLS is not supported by this dcron; use etcd:// (plain HTTP/2) behind a private network"
                )))
            }
            "zk" | "zookeeper" => {
                let rest = url.take_userinfo(rest, &shown)?;
                Endpoint::Zookeeper(parse_zk(&rest, &shown)?)
            }
            "consul" | "consul+http" => parse_consul(rest, "http", &shown)?,
            "consul+https" => parse_consul(rest, "https", &shown)?,
            other => {
                return Err(invalid(format!(
                    "registry `{shown}`: unknown scheme `{other}://`; use {SCHEMES}"
                )))
            }
        };
        Ok(url)
    }

    /// The backend the URL names (`memory`, `redis`, `etcd`, `zookeeper`,
    /// `consul`).
    pub fn backend(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Memory => "memory",
            Endpoint::Redis(_) => "redis",
            Endpoint::Etcd(_) => "etcd",
            Endpoint::Zookeeper(_) => "zookeeper",
            Endpoint::Consul { .. } => "consul",
        }
    }

    /// Whether the URL asks for TLS (`rediss://`, `consul+https://`).
    pub fn uses_tls(&self) -> bool {
        match &self.endpoint {
            Endpoint::Redis(url) => url
                .get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("rediss://")),
            Endpoint::Consul { address, .. } => address.starts_with("https://"),
            _ => false,
        }
    }

    /// Whether the URL itself carries a password (`user:password@`).
    pub fn has_password(&self) -> bool {
        match &self.endpoint {
            Endpoint::Redis(url) => userinfo(url).is_some_and(|u| u.contains(':')),
            _ => self.password.is_some(),
        }
    }

    /// The user name the URL carries (etcd, ZooKeeper), if any.
    pub fn user_name(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Sets the user name (etcd user, ZooKeeper digest user, Redis ACL user).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Sets the password (etcd, ZooKeeper digest, Redis), replacing one in
    /// the URL. Never shown.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(Secret::new(password));
        self
    }

    /// Sets the Consul ACL token. Never shown.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Secret::new(token));
        self
    }

    /// The node TTL the registry will serve: ZooKeeper opens its session
    /// with it (the session is the node's liveness); other backends take
    /// the TTL per call and ignore this.
    pub fn node_ttl(mut self, ttl: Duration) -> Self {
        self.node_ttl = Some(ttl);
        self
    }

    /// Connects with the backend's defaults and the credentials given.
    pub async fn connect(&self) -> Result<Arc<dyn Registry>> {
        match &self.endpoint {
            Endpoint::Memory => Ok(Arc::new(MemoryRegistry::new())),
            Endpoint::Redis(url) => self.connect_redis(url).await,
            Endpoint::Etcd(endpoints) => self.connect_etcd(endpoints).await,
            Endpoint::Zookeeper(connect) => self.connect_zookeeper(connect).await,
            Endpoint::Consul {
                address,
                datacenter,
            } => self.connect_consul(address, datacenter.as_deref()).await,
        }
    }

    /// Moves `user[:password]@` out of `rest` into the URL's credentials.
    fn take_userinfo(&mut self, rest: &str, shown: &str) -> Result<String> {
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let Some(at) = rest[..authority_end].rfind('@') else {
            return Ok(rest.to_string());
        };
        let (user, password) = match rest[..at].split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (&rest[..at], None),
        };
        if user.is_empty() {
            return Err(invalid(format!(
                "registry `{shown}`: empty user name before `@`"
            )));
        }
        self.user = Some(user.to_string());
        self.password = password.map(Secret::new);
        Ok(rest[at + 1..].to_string())
    }

    /// The user and password, both or neither.
    #[cfg_attr(not(any(feature = "etcd", feature = "zookeeper")), allow(dead_code))]
    fn credentials(&self) -> Result<Option<(&str, &str)>> {
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => Ok(Some((user.as_str(), password.expose()))),
            (None, None) => Ok(None),
            (Some(user), None) => Err(invalid(format!(
                "registry `{}`: user `{user}` given without a password",
                self.shown
            ))),
            (None, Some(_)) => Err(invalid(format!(
                "registry `{}`: a password given without a user",
                self.shown
            ))),
        }
    }

    #[allow(unused_variables)]
    async fn connect_redis(&self, url: &str) -> Result<Arc<dyn Registry>> {
        #[cfg(feature = "redis")]
        {
            let url = self.redis_url_with_credentials(url)?;
            let registry = crate::registry::RedisRegistry::builder(url)
                .connect()
                .await?;
            Ok(Arc::new(registry))
        }
        #[cfg(not(feature = "redis"))]
        Err(missing_feature("redis"))
    }

    /// The Redis URL with the user and password set on this value (they
    /// override credentials in the URL), percent-encoded.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn redis_url_with_credentials(&self, url: &str) -> Result<String> {
        if self.user.is_none() && self.password.is_none() {
            return Ok(url.to_string());
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(url.to_string());
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        // What the URL carries stays unless replaced (already encoded).
        let (old_user, old_password, host) = match rest[..authority_end].rfind('@') {
            Some(at) => {
                let info = &rest[..at];
                let (user, password) = info.split_once(':').unwrap_or((info, ""));
                (user, password, &rest[at + 1..])
            }
            None => ("", "", rest),
        };
        let user = self
            .user
            .as_deref()
            .map_or(old_user.to_string(), percent_encode);
        let password = match &self.password {
            Some(p) => format!(":{}", percent_encode(p.expose())),
            None if old_password.is_empty() => String::new(),
            None => format!(":{old_password}"),
        };
        if user.is_empty() && password.is_empty() {
            return Ok(format!("{scheme}://{host}"));
        }
        Ok(format!("{scheme}://{user}{password}@{host}"))
    }

    #[allow(unused_variables)]
    async fn connect_etcd(&self, endpoints: &[String]) -> Result<Arc<dyn Registry>> {
        #[cfg(feature = "etcd")]
        {
            let mut builder = crate::registry::EtcdRegistry::builder(endpoints);
            if let Some((user, password)) = self.credentials()? {
                builder = builder.user(user, password);
            }
            Ok(Arc::new(builder.connect().await?))
        }
        #[cfg(not(feature = "etcd"))]
        Err(missing_feature("etcd"))
    }

    #[allow(unused_variables)]
    async fn connect_zookeeper(&self, connect: &str) -> Result<Arc<dyn Registry>> {
        #[cfg(feature = "zookeeper")]
        {
            let mut builder = crate::registry::ZookeeperRegistry::builder(connect);
            if let Some(ttl) = self.node_ttl {
                builder = builder.session_timeout(ttl);
            }
            if let Some((user, password)) = self.credentials()? {
                builder = builder.digest_auth(user, password);
            }
            Ok(Arc::new(builder.connect().await?))
        }
        #[cfg(not(feature = "zookeeper"))]
        Err(missing_feature("zookeeper"))
    }

    #[allow(unused_variables)]
    async fn connect_consul(
        &self,
        address: &str,
        datacenter: Option<&str>,
    ) -> Result<Arc<dyn Registry>> {
        #[cfg(feature = "consul")]
        {
            let mut builder = crate::registry::ConsulRegistry::builder(address);
            if let Some(token) = &self.token {
                builder = builder.token(token.expose());
            }
            if let Some(dc) = datacenter {
                builder = builder.datacenter(dc);
            }
            Ok(Arc::new(builder.connect().await?))
        }
        #[cfg(not(feature = "consul"))]
        Err(missing_feature("consul"))
    }
}

/// `url` with any password, and the value of every query parameter but
/// `dc`, replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(redact_query(query))),
        None => (rest, None),
    };
    let query = query.map_or(String::new(), |q| format!("?{q}"));
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let shown = match rest[..at].split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                // Consul has no users: whatever stands there is a token.
                None if scheme.to_ascii_lowercase().starts_with("consul") => "***".to_string(),
                None => rest[..at].to_string(),
            };
            format!("{scheme}://{shown}{}{query}", &rest[at..])
        }
        None => format!("{scheme}://{rest}{query}"),
    }
}

/// `a=1&dc=eu` as `a=***&dc=eu`: only the datacenter is known not to be
/// a secret.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("dc", _)) => pair.to_string(),
            Some((key, _)) => format!("{key}=***"),
            None if pair.is_empty() => String::new(),
            None => "***".to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn invalid(message: String) -> Error {
    Error::InvalidConfig(message)
}

#[allow(dead_code)]
fn missing_feature(backend: &str) -> Error {
    invalid(format!(
        "this dcron was built without the `{backend}` backend; enable its cargo feature `{backend}`"
    ))
}

/// The `user[:password]` before `@` in a URL, if any.
fn userinfo(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest[..authority_end].rfind('@').map(|at| &rest[..at])
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `redis[s]://[userinfo@]host[:port][/db]`: a host and a numeric db.
fn check_redis(rest: &str, shown: &str) -> Result<()> {
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host = authority
        .rfind('@')
        .map_or(authority, |at| &authority[at + 1..]);
    if host.is_empty() {
        return Err(invalid(format!(
            "registry `{shown}` has no host; use e.g. redis://127.0.0.1:6379"
        )));
    }
    host_port(host, 6379, shown)?;
    let path = &rest[authority_end..];
    let db = path
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_matches('/');
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err(invalid(format!(
            "registry `{shown}`: the path must be a database number (redis://host:6379/0), not `/{db}`"
        )));
    }
    Ok(())
}

/// Checks `host[:port]` (IPv6 in brackets) and adds `default_port`.
fn host_port(item: &str, default_port: u16, shown: &str) -> Result<String> {
    let bad = |why: &str| invalid(format!("registry `{shown}`: `{item}` {why}"));
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

fn no_query(rest: &str, shown: &str) -> Result<()> {
    if rest.contains(['?', '#']) {
        return Err(invalid(format!(
            "registry `{shown}`: query parameters are not supported here"
        )));
    }
    Ok(())
}

fn parse_etcd(rest: &str, shown: &str) -> Result<Vec<String>> {
    no_query(rest, shown)?;
    let hosts = rest.trim_end_matches('/');
    if hosts.contains('/') {
        return Err(invalid(format!(
            "registry `{shown}`: etcd URLs have no path; use etcd://host:port[,host:port]"
        )));
    }
    hosts
        .split(',')
        .map(|h| host_port(h, 2379, shown).map(|hp| format!("http://{hp}")))
        .collect()
}

fn parse_zk(rest: &str, shown: &str) -> Result<String> {
    no_query(rest, shown)?;
    let (hosts, chroot) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let hosts = hosts
        .split(',')
        .map(|h| host_port(h, 2181, shown))
        .collect::<Result<Vec<_>>>()?;
    if chroot.contains("//") || chroot.split('/').any(|s| s == "." || s == "..") {
        return Err(invalid(format!(
            "registry `{shown}`: invalid chroot `{chroot}`"
        )));
    }
    Ok(format!("{}{chroot}", hosts.join(",")))
}

fn parse_consul(rest: &str, http: &str, shown: &str) -> Result<Endpoint> {
    if rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())].contains('@') {
        return Err(invalid(format!(
            "registry `{shown}`: do not put credentials in a Consul URL; pass the ACL token separately"
        )));
    }
    if rest.contains('#') {
        return Err(invalid(format!(
            "registry `{shown}`: a fragment (`#`) is not allowed"
        )));
    }
    let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match base.find('/') {
        Some(i) => (&base[..i], base[i..].trim_end_matches('/')),
        None => (base, ""),
    };
    if authority.contains(',') {
        return Err(invalid(format!(
            "registry `{shown}`: Consul takes one agent address (the local agent forwards to the servers)"
        )));
    }
    let hp = host_port(authority, 8500, shown)?;
    let mut datacenter = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("dc", dc)) if !dc.is_empty() => datacenter = Some(dc.to_string()),
            _ => {
                let key = pair.split_once('=').map_or("***", |(key, _)| key);
                return Err(invalid(format!(
                    "registry `{shown}`: unknown query parameter `{key}`; only `dc=DATACENTER` is supported"
                )));
            }
        }
    }
    Ok(Endpoint::Consul {
        address: format!("{http}://{hp}{path}"),
        datacenter,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(raw: &str) -> Endpoint {
        RegistryUrl::parse(raw).expect(raw).endpoint
    }

    fn message(raw: &str) -> String {
        RegistryUrl::parse(raw).expect_err(raw).to_string()
    }

    #[test]
    fn redis_urls() {
        assert_eq!(
            endpoint("redis://127.0.0.1:6379/2"),
            Endpoint::Redis("redis://127.0.0.1:6379/2".into())
        );
        assert!(RegistryUrl::parse("rediss://:pw@cache.example:6380").is_ok());
        assert!(message("redis://127.0.0.1/notanumber").contains("database number"));
        assert!(message("redis://").contains("no host"));
        assert!(RegistryUrl::parse("redis+unix:///run/redis.sock").is_ok());
        let tls = |u: &str| RegistryUrl::parse(u).expect(u).uses_tls();
        assert!(tls("rediss://h:1") && tls("consul+https://h:1") && !tls("redis://h:1"));
    }

    #[test]
    fn etcd_urls() {
        assert_eq!(
            endpoint("etcd://a:2379,b:2380,[::1]:1"),
            Endpoint::Etcd(vec![
                "http://a:2379".into(),
                "http://b:2380".into(),
                "http://[::1]:1".into()
            ])
        );
        let url = RegistryUrl::parse("etcd://root@a").expect("valid");
        assert_eq!(url.endpoint, Endpoint::Etcd(vec!["http://a:2379".into()]));
        assert_eq!((url.user_name(), url.has_password()), (Some("root"), false));
        let url = RegistryUrl::parse("etcd://root:s3cret@a:2379").expect("valid");
        assert!(url.has_password());
        assert_eq!(url.credentials().expect("both"), Some(("root", "s3cret")));
        assert!(!format!("{url} {url:?}").contains("s3cret"));
        for bad in ["etcd://a:99999", "etcd://a:1,", "etcd://a:1/x", "etcd://@a"] {
            assert!(RegistryUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zk_urls() {
        assert_eq!(
            endpoint("zk://z1:2181,z2/dcron/prod/"),
            Endpoint::Zookeeper("z1:2181,z2:2181/dcron/prod".into())
        );
        assert_eq!(endpoint("zk://z1"), Endpoint::Zookeeper("z1:2181".into()));
        assert!(message("zk://z1/a//b").contains("chroot"));
    }

    #[test]
    fn consul_urls() {
        assert_eq!(
            endpoint("consul://127.0.0.1:8500"),
            Endpoint::Consul {
                address: "http://127.0.0.1:8500".into(),
                datacenter: None
            }
        );
        assert_eq!(
            endpoint("consul+https://consul.example?dc=eu1"),
            Endpoint::Consul {
                address: "https://consul.example:8500".into(),
                datacenter: Some("eu1".into())
            }
        );
        let m = message("consul://s3cretPW@host:8500");
        assert!(m.contains("credentials") && !m.contains("s3cretPW"), "{m}");
        assert!(message("consul://a:1,b:2").contains("one agent"));
        let m = message("consul://a:1?dc=eu&token=t0ken");
        assert!(
            m.contains("unknown query parameter `token`") && !m.contains("t0ken"),
            "{m}"
        );
        assert_eq!(
            redact("consul://a:1?dc=eu&token=t0ken"),
            "consul://a:1?dc=eu&token=***"
        );
        let url = RegistryUrl::parse("consul://a:1")
            .expect("valid")
            .token("t0ken");
        assert!(!format!("{url} {url:?}").contains("t0ken"));
    }

    #[test]
    fn other_schemes_are_refused_and_memory_is_local() {
        assert!(message("mysql://x").contains("unknown scheme"));
        assert!(message("localhost:6379").contains("not a URL"));
        assert!(message("etcd+https://a:1").contains("TLS"));
        assert_eq!(endpoint("memory://"), Endpoint::Memory);
        assert!(message("memory://somewhere").contains("takes no address"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:pw@h"), "redis://u:***@h");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(redact("etcd://u@h"), "etcd://u@h");
        assert!(!message("redis://:hunter2@h/zz").contains("hunter2"));
        let url = RegistryUrl::parse("redis://:hunter2@h:1/0").expect("valid");
        assert!(url.has_password());
        assert!(!format!("{url} {url:?}").contains("hunter2"));
    }

    #[test]
    fn redis_credentials_are_set_percent_encoded() {
        let url = RegistryUrl::parse("redis://127.0.0.1:6379/1")
            .expect("valid")
            .password("p@ss word");
        assert_eq!(
            url.redis_url_with_credentials("redis://127.0.0.1:6379/1")
                .expect("valid"),
            "redis://:p%40ss%20word@127.0.0.1:6379/1"
        );
        let url = RegistryUrl::parse("redis://old:pw@h:1")
            .expect("valid")
            .user("new");
        assert_eq!(
            url.redis_url_with_credentials("redis://old:pw@h:1")
                .expect("valid"),
            "redis://new:pw@h:1"
        );
        let plain = RegistryUrl::parse("redis://h:1").expect("valid");
        assert_eq!(
            plain
                .redis_url_with_credentials("redis://h:1")
                .expect("valid"),
            "redis://h:1"
        );
    }

    #[tokio::test]
    async fn memory_urls_connect_and_missing_backends_say_so() {
        let registry = connect("memory://").await.expect("memory");
        assert_eq!(registry.backend(), "memory");
        if !cfg!(feature = "redis") {
            let Err(err) = connect("redis://127.0.0.1:1").await else {
                panic!("connected without the backend");
            };
            assert!(err.to_string().contains("built without"), "{err}");
        }
    }
}
