//! Configuration: built-in defaults, then a TOML file, then `PALPO__*` environment variables.
//!
//! Every key is documented in `config/palpo.example.toml`. Loading either yields a validated
//! [`Config`] or a [`ConfigError`] whose message names the offending key in one line.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Why the configuration could not be loaded. The message is one line and names the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn key(key: &str, problem: impl fmt::Display) -> Self {
        ConfigError(format!("`{key}`: {problem}"))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The server name in user ids (`@alice:server_name`). Cannot change once users exist.
    pub server_name: String,
    /// Address the HTTP listener binds to.
    pub listen: SocketAddr,
    /// Directory for the SQLite database and other local files.
    pub data_dir: PathBuf,
    /// Public URL clients reach this server at; defaults to `http://<listen>`.
    #[serde(default)]
    pub public_base_url: Option<String>,
    /// Tracing filter, e.g. `info` or `palpo=debug,sqlx=warn`.
    pub log: String,
    pub database: DatabaseConfig,
    pub cache: CacheConfig,
    pub registration: RegistrationConfig,
    pub rate_limit: RateLimitConfig,
    pub limits: LimitsConfig,
    pub well_known: WellKnownConfig,
    pub rooms: RoomsConfig,
    pub presence: PresenceConfig,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://...`, `postgres://...` or `mysql://...`. Empty = `sqlite://<data_dir>/palpo.db`.
    #[serde(default)]
    pub url: String,
    /// Read replicas (PostgreSQL streaming replicas of `url`).
    #[serde(default)]
    pub replica_urls: Vec<String>,
    /// Connections per set: the primary's pool for writes, its readers, each replica's pool
    /// (the SQLite writer always has exactly one connection).
    pub max_connections: u32,
    /// Seconds to wait for a pooled connection before failing the request.
    pub acquire_timeout_secs: u64,
}

// Database URLs carry passwords: Debug shows them redacted.
impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(&self.url))
            .field(
                "replica_urls",
                &self
                    .replica_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout_secs", &self.acquire_timeout_secs)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// `redis://host:port/db`. Unset = no cache.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    pub namespace: String,
    /// How long a cached entry lives, in seconds.
    pub ttl_secs: u64,
}

impl fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("namespace", &self.namespace)
            .field("ttl_secs", &self.ttl_secs)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    pub enabled: bool,
    /// When set, registration requires `m.login.registration_token` with this token.
    #[serde(default)]
    pub token: Option<String>,
}

impl fmt::Debug for RegistrationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrationConfig")
            .field("enabled", &self.enabled)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Master switch: `false` turns every limit off (load tests, test clients).
    pub enabled: bool,
    pub login: RateLimit,
    pub registration: RateLimit,
}

/// A token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body accepted, in bytes; larger ones get 413 `M_TOO_LARGE`.
    pub max_request_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WellKnownConfig {
    /// `m.homeserver.base_url` served at `/.well-known/matrix/client`; default `public_base_url`.
    #[serde(default)]
    pub client: Option<String>,
    /// `m.server` served at `/.well-known/matrix/server`, e.g. `matrix.example.org:443`.
    /// Unset = the endpoint answers 404 and peers use the server name.
    #[serde(default)]
    pub server: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomsConfig {
    /// The room version `createRoom` uses when the client names none.
    pub default_version: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceConfig {
    /// Seconds without activity (a sync, or setting their presence) after which an `online`
    /// user is shown `unavailable`.
    pub idle_timeout_secs: u64,
}

/// Room versions new rooms may be created in (1 and 2 are understood but not created).
pub const CREATABLE_ROOM_VERSIONS: &[&str] = &["3", "4", "5", "6", "7", "8", "9", "10", "11", "12"];

/// The defaults, as TOML: the bottom layer of the configuration.
const DEFAULTS: &str = r#"
server_name = "localhost"
listen = "127.0.0.1:8008"
data_dir = "./data"
log = "info"

[database]
url = ""
replica_urls = []
max_connections = 10
acquire_timeout_secs = 30

[cache]
namespace = "palpo"
ttl_secs = 300

[registration]
enabled = true

[rate_limit]
enabled = true
login = { per_second = 0.2, burst = 5 }
registration = { per_second = 0.2, burst = 5 }

[limits]
max_request_bytes = 1048576

[well_known]

[rooms]
default_version = "12"

[presence]
idle_timeout_secs = 300
"#;

impl Config {
    /// Loads defaults, then `file` (or `config/palpo.toml` when it exists), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, env)
    }

    /// As [`Config::load`], with the environment given explicitly (tests use this).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        use config::{File, FileFormat};

        let mut builder =
            config::Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError(format!(
                        "config file {} does not exist",
                        path.display()
                    )));
                }
                builder = builder.add_source(File::from(path).format(FileFormat::Toml));
            }
            None => {
                let default_path = Path::new("config/palpo.toml");
                if default_path.exists() {
                    builder = builder.add_source(File::from(default_path).format(FileFormat::Toml));
                }
            }
        }
        let env_map: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("PALPO__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("PALPO")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("database.replica_urls")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let raw = builder
            .build()
            .map_err(|e| ConfigError(one_line(&e.to_string())))?;
        let mut config: Config = raw
            .try_deserialize()
            .map_err(|e| ConfigError(one_line(&e.to_string())))?;
        config.finish()?;
        Ok(config)
    }

    /// Fills derived defaults and checks values that serde cannot.
    fn finish(&mut self) -> Result<(), ConfigError> {
        validate_server_name(&self.server_name)
            .map_err(|problem| ConfigError::key("server_name", problem))?;
        if self.database.url.trim().is_empty() {
            self.database.url = format!("sqlite://{}/palpo.db", self.data_dir.display());
        }
        let scheme = self.database.url.split("://").next().unwrap_or_default();
        if !matches!(
            scheme,
            "sqlite" | "postgres" | "postgresql" | "mysql" | "mariadb"
        ) {
            return Err(ConfigError::key(
                "database.url",
                format!(
                    "unsupported scheme in {}: use sqlite://, postgres:// or mysql://",
                    redact_url(&self.database.url)
                ),
            ));
        }
        if self.database.url.starts_with("mariadb://") {
            self.database.url = self.database.url.replacen("mariadb://", "mysql://", 1);
        }
        if !self.database.replica_urls.is_empty() && !self.database.url.starts_with("postgres") {
            return Err(ConfigError::key(
                "database.replica_urls",
                "replicas are supported with PostgreSQL only",
            ));
        }
        for replica in &self.database.replica_urls {
            if !replica.starts_with("postgres") {
                return Err(ConfigError::key(
                    "database.replica_urls",
                    format!("{} is not a postgres:// URL", redact_url(replica)),
                ));
            }
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::key(
                "database.max_connections",
                "must be at least 1",
            ));
        }
        if let Some(url) = &self.cache.redis_url {
            if url.trim().is_empty() {
                self.cache.redis_url = None;
            } else if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                return Err(ConfigError::key(
                    "cache.redis_url",
                    format!("{} is not a redis:// URL", redact_url(url)),
                ));
            }
        }
        for (key, limit) in [
            ("rate_limit.login", self.rate_limit.login),
            ("rate_limit.registration", self.rate_limit.registration),
        ] {
            if !(limit.per_second > 0.0 && limit.per_second.is_finite()) || limit.burst == 0 {
                return Err(ConfigError::key(
                    key,
                    "per_second must be > 0 and burst >= 1 (set rate_limit.enabled = false to turn limits off)",
                ));
            }
        }
        if !CREATABLE_ROOM_VERSIONS.contains(&self.rooms.default_version.as_str()) {
            return Err(ConfigError::key(
                "rooms.default_version",
                format!(
                    "{:?} is not a room version new rooms can be created in ({})",
                    self.rooms.default_version,
                    CREATABLE_ROOM_VERSIONS.join(", ")
                ),
            ));
        }
        if self.presence.idle_timeout_secs == 0 {
            return Err(ConfigError::key(
                "presence.idle_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.limits.max_request_bytes < 1024 {
            return Err(ConfigError::key(
                "limits.max_request_bytes",
                "must be at least 1024",
            ));
        }
        if let Some(token) = &self.registration.token
            && token.is_empty()
        {
            self.registration.token = None;
        }
        Ok(())
    }

    /// The URL clients should use to reach this server.
    pub fn public_base_url(&self) -> String {
        match &self.public_base_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.listen),
        }
    }
}

/// A server name is a hostname, IPv4 or bracketed IPv6 literal, with an optional port.
fn validate_server_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    let (host, port) = if let Some(rest) = name.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or_else(|| format!("{name:?}: unclosed IPv6 literal"))?;
        (&name[..end + 2], rest[end + 1..].strip_prefix(':'))
    } else {
        match name.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (name, None),
        }
    };
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(format!("{name:?}: port is not a number from 0 to 65535"));
    }
    let valid_host = host.starts_with('[')
        || (!host.is_empty()
            && host.len() <= 255
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
    if !valid_host {
        return Err(format!("{name:?} is not a valid hostname or IP literal"));
    }
    Ok(())
}

/// Replaces the password of a URL with `***`, so it can be logged.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(_) => raw.to_owned(),
        // Not parseable: show only the scheme, in case a secret is inside.
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://<unparseable>"),
            None => "<unparseable>".to_owned(),
        },
    }
}

/// config-rs errors can span lines; the operator gets one.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_no_configuration() {
        let config = Config::load_from(None, env(&[])).expect("defaults load");
        assert_eq!(config.server_name, "localhost");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8008");
        assert_eq!(config.database.url, "sqlite://./data/palpo.db");
        assert!(config.database.replica_urls.is_empty());
        assert!(config.cache.redis_url.is_none());
        assert!(config.registration.enabled);
    }

    #[test]
    fn environment_overrides_nested_keys_and_lists() {
        let config = Config::load_from(
            None,
            env(&[
                ("PALPO__SERVER_NAME", "example.org"),
                ("PALPO__DATABASE__URL", "postgres://u:secret@db/palpo"),
                (
                    "PALPO__DATABASE__REPLICA_URLS",
                    "postgres://r1/palpo,postgres://r2/palpo",
                ),
                ("PALPO__DATABASE__MAX_CONNECTIONS", "42"),
                ("PALPO__RATE_LIMIT__ENABLED", "false"),
                ("PALPO__CACHE__REDIS_URL", "redis://127.0.0.1:6379"),
            ]),
        )
        .expect("loads");
        assert_eq!(config.server_name, "example.org");
        assert_eq!(config.database.replica_urls.len(), 2);
        assert_eq!(config.database.max_connections, 42);
        assert!(!config.rate_limit.enabled);
        let debug = format!("{config:?}");
        assert!(!debug.contains("secret"), "password leaked: {debug}");
    }

    #[test]
    fn file_layer_sits_between_defaults_and_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("palpo.toml");
        std::fs::write(
            &path,
            "server_name = \"file.example\"\nlisten = \"0.0.0.0:9000\"\n",
        )
        .expect("write");
        let config = Config::load_from(Some(&path), env(&[("PALPO__SERVER_NAME", "env.example")]))
            .expect("loads");
        assert_eq!(config.server_name, "env.example");
        assert_eq!(config.listen.port(), 9000);
    }

    #[test]
    fn bad_values_name_their_key_in_one_line() {
        let err = Config::load_from(None, env(&[("PALPO__DATABASE__MAX_CONNECTIONS", "many")]))
            .expect_err("rejects");
        let msg = err.to_string();
        assert!(msg.contains("max_connections"), "{msg}");
        assert!(!msg.contains('\n'));

        let err = Config::load_from(None, env(&[("PALPO__SERVER_NAME", "bad name!")]))
            .expect_err("rejects");
        assert!(err.to_string().contains("server_name"), "{err}");

        let err = Config::load_from(None, env(&[("PALPO__DATABASE__URL", "oracle://u:pw@x/db")]))
            .expect_err("rejects");
        assert!(err.to_string().contains("database.url"), "{err}");
        assert!(!err.to_string().contains(":pw@"), "{err}");

        let err =
            Config::load_from(None, env(&[("PALPO__LISTEN", "nowhere")])).expect_err("rejects");
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn default_room_version_is_configurable_and_checked() {
        let config = Config::load_from(None, env(&[])).expect("loads");
        assert_eq!(config.rooms.default_version, "12");
        let config = Config::load_from(None, env(&[("PALPO__ROOMS__DEFAULT_VERSION", "10")]))
            .expect("loads");
        assert_eq!(config.rooms.default_version, "10");
        let err = Config::load_from(None, env(&[("PALPO__ROOMS__DEFAULT_VERSION", "2")]))
            .expect_err("v2 rooms cannot be created");
        assert!(err.to_string().contains("rooms.default_version"), "{err}");
    }

    #[test]
    fn presence_idle_timeout_is_configurable_and_checked() {
        let config = Config::load_from(None, env(&[])).expect("loads");
        assert_eq!(config.presence.idle_timeout_secs, 300);
        let config = Config::load_from(None, env(&[("PALPO__PRESENCE__IDLE_TIMEOUT_SECS", "60")]))
            .expect("loads");
        assert_eq!(config.presence.idle_timeout_secs, 60);
        let err = Config::load_from(None, env(&[("PALPO__PRESENCE__IDLE_TIMEOUT_SECS", "0")]))
            .expect_err("0 is refused");
        assert!(
            err.to_string().contains("presence.idle_timeout_secs"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_in_a_file_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("palpo.toml");
        std::fs::write(&path, "[database]\nurll = \"x\"\n").expect("write");
        let err = Config::load_from(Some(&path), env(&[])).expect_err("rejects");
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(
            redact_url("postgres://alice:hunter2@db:5432/palpo"),
            "postgres://alice:***@db:5432/palpo"
        );
        assert_eq!(
            redact_url("sqlite://./data/palpo.db"),
            "sqlite://./data/palpo.db"
        );
    }
}
