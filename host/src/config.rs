//! Configuration: command-line flags, each also settable from a `HARBOR_*` environment variable,
//! over an optional TOML file, over defaults. The result is one validated [`Config`].
//!
//! Each setting is written as a flag ([`RunArgs`], [`ProxyArgs`]: its doc, its group, its
//! environment variable) and as the field where it is used ([`Config`], [`ProxySettings`]), whose
//! `Default` is the one place its default lives: the help shows it from there. The TOML key is
//! the flag's name with `_`. The layers merge generically: the flags given are laid over the
//! file's keys, and what neither names takes the default (`#[serde(default)]`). A file key no
//! flag has is an error that names it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize, Serializer};

pub use crate::backend::BaseUrl;
use crate::registry::LeaseLimits;

#[derive(Parser, Debug)]
#[command(
    name = "harbor",
    version,
    about = "Single-host service registry and proxy controller",
    long_about = "Harbor keeps a registry of services — static ones from .route files, ephemeral \
                  ones registered over its REST API with a TTL lease — and makes a reverse proxy \
                  route to them.\n\nEvery flag can also be set from the environment variable \
                  shown beside it, or in a TOML file given with --config (same names, with '_' \
                  for '-')."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

impl Cli {
    /// The command line, each setting's help ending in its default as read from the defaults
    /// themselves, so that the help and the behaviour cannot disagree.
    pub fn command_with_defaults() -> clap::Command {
        let defaults = Config::default().keys();
        Self::command().mut_args(|arg| {
            let Some(shown) = defaults.get(arg.get_id().as_str()).and_then(shown_default) else {
                return arg;
            };
            let with_default = |help: &clap::builder::StyledStr| {
                let help = help.to_string();
                (!help.contains("[default:")).then(|| format!("{help} [default: {shown}]"))
            };
            let help = arg.get_help().and_then(with_default);
            let long_help = arg.get_long_help().and_then(with_default);
            let arg = match help {
                Some(help) => arg.help(help),
                None => arg,
            };
            match long_help {
                Some(long_help) => arg.long_help(long_help),
                None => arg,
            }
        })
    }

    /// The command line of this process, parsed; exits with clap's message on a bad one.
    pub fn parse_with_defaults() -> Self {
        let matches = Self::command_with_defaults().get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// A default as the help shows it; none for a setting that is off or empty by default.
fn shown_default(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Array(list) if !list.is_empty() => Some(
            list.iter()
                .filter_map(shown_default)
                .collect::<Vec<_>>()
                .join(","),
        ),
        _ => None,
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon (the default when no command is given).
    Run,
    /// Work with plugin components.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Run demo backends: HTTP requests are answered with which backend served them, anything
    /// else is echoed back byte for byte.
    Echo {
        /// Addresses to listen on; repeat or comma-separate for several backends.
        #[arg(long, required = true, value_name = "ADDR", value_delimiter = ',')]
        listen: Vec<SocketAddr>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Run the admission check on a component file, offline: it must instantiate, implement
    /// harbor:strategy@0.5.0, describe itself and answer sample picks within its deadline.
    Check {
        /// The component (.wasm) to check.
        file: PathBuf,
    },
}

#[derive(Args, Debug, Default, Serialize)]
pub struct RunArgs {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, env = "HARBOR_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Directory of .route files, followed live.
    #[arg(
        long,
        env = "HARBOR_ROUTES",
        value_name = "DIR",
        help_heading = "Routes and leases"
    )]
    pub routes: Option<PathBuf>,

    /// Where ephemeral registrations are kept across restarts.
    #[arg(
        long,
        env = "HARBOR_STATE_DIR",
        value_name = "DIR",
        help_heading = "Routes and leases"
    )]
    pub state_dir: Option<PathBuf>,

    /// API listener: ADDR:PORT or unix:/path/to.sock; repeat or comma-separate for several.
    #[arg(
        long,
        env = "HARBOR_API",
        value_name = "ADDR",
        value_delimiter = ',',
        help_heading = "API"
    )]
    pub api: Vec<ListenAddr>,

    /// Which proxy Harbor drives.
    #[arg(long, env = "HARBOR_BACKEND", value_enum, help_heading = "Proxy")]
    pub backend: Option<BackendKind>,

    /// Where the embedded HTTP proxy listens.
    #[arg(
        long,
        env = "HARBOR_PROXY_LISTEN",
        value_name = "ADDR",
        help_heading = "Proxy"
    )]
    pub proxy_listen: Option<SocketAddr>,

    /// Where the proxy serves HTTPS (TLS terminated with the certificate each host's `tls`
    /// setting names): the embedded proxy's listener, or Envoy's, with certificates Harbor
    /// obtains. Without it (and without --caddy-tls-listen) nothing is served over TLS.
    #[arg(
        long,
        env = "HARBOR_TLS_LISTEN",
        value_name = "ADDR",
        help_heading = "Proxy"
    )]
    pub tls_listen: Option<SocketAddr>,

    /// The ACME directory `tls = "auto"` certificates come from (Let's Encrypt by default).
    #[arg(
        long,
        env = "HARBOR_ACME_DIRECTORY",
        value_name = "URL",
        help_heading = "TLS"
    )]
    pub acme_directory: Option<String>,

    /// The contact address given to the ACME CA (expiry notices, account recovery).
    #[arg(
        long,
        env = "HARBOR_ACME_EMAIL",
        value_name = "EMAIL",
        help_heading = "TLS"
    )]
    pub acme_email: Option<String>,

    /// A root certificate (PEM) to trust for the ACME directory's own HTTPS: a private CA.
    #[arg(
        long,
        env = "HARBOR_ACME_CA_ROOT",
        value_name = "FILE",
        help_heading = "TLS"
    )]
    pub acme_ca_root: Option<PathBuf>,

    /// How the ACME CA is shown control of a name: http-01 (the plain listener, port 80) or
    /// tls-alpn-01 (the TLS listener, port 443) [default: http-01].
    #[arg(long, env = "HARBOR_ACME_CHALLENGE", value_enum, help_heading = "TLS")]
    pub acme_challenge: Option<crate::tls::acme::Challenge>,

    /// Renew an ACME certificate when it has less than this left [default: 30d].
    #[arg(long, env = "HARBOR_ACME_RENEW_BEFORE", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "TLS")]
    pub acme_renew_before: Option<Duration>,

    /// A second listener that serves only the Gangway dashboard and its public data (never the
    /// mutating API), for exposing the dashboard while the API stays private.
    #[arg(
        long,
        env = "HARBOR_GANGWAY_LISTEN",
        value_name = "ADDR",
        help_heading = "API"
    )]
    pub gangway_listen: Option<SocketAddr>,

    /// Directory of custom plugins (.wasm components).
    #[arg(
        long,
        env = "HARBOR_PLUGINS",
        value_name = "DIR",
        help_heading = "Plugins"
    )]
    pub plugins: Option<PathBuf>,

    /// Bearer tokens for mutating API calls, one per line: `TOKEN` for full access, or
    /// `TOKEN SERVICE-PREFIX [hosts=PATTERN,...] [listen=IP:PORT[-PORT],...]` for a scoped one.
    #[arg(
        long,
        env = "HARBOR_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "API"
    )]
    pub token_file: Option<PathBuf>,

    /// Connections the API listeners take at once, and as many for Gangway's; more are closed
    /// as they arrive.
    #[arg(
        long,
        env = "HARBOR_API_MAX_CONNECTIONS",
        value_name = "N",
        help_heading = "API"
    )]
    pub api_max_connections: Option<usize>,

    /// Put every read of the API behind a token too (any valid token reads everything), but
    /// for `/healthz` and Gangway's public view.
    #[arg(long, env = "HARBOR_PROTECT_READS", help_heading = "API")]
    #[serde(serialize_with = "on_if_given")]
    pub protect_reads: bool,

    /// Shortest lease a registration may ask for.
    #[arg(long, env = "HARBOR_TTL_MIN", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Routes and leases")]
    pub ttl_min: Option<Duration>,

    /// Longest lease a registration may ask for.
    #[arg(long, env = "HARBOR_TTL_MAX", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Routes and leases")]
    pub ttl_max: Option<Duration>,

    /// Lease given when a registration names no TTL.
    #[arg(long, env = "HARBOR_TTL_DEFAULT", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Routes and leases")]
    pub ttl_default: Option<Duration>,

    /// Re-read the routes directory this often even without change events; 0 turns it off.
    #[arg(long, env = "HARBOR_RESCAN_INTERVAL", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Routes and leases")]
    pub rescan_interval: Option<Duration>,

    /// Do not watch the routes directory for changes (rely on rescans and SIGHUP).
    #[arg(long, env = "HARBOR_NO_WATCH", help_heading = "Routes and leases")]
    #[serde(rename = "watch", serialize_with = "off_if_given")]
    pub no_watch: bool,

    /// Largest API request body, in bytes.
    #[arg(
        long,
        env = "HARBOR_MAX_BODY",
        value_name = "BYTES",
        help_heading = "API"
    )]
    pub max_body: Option<usize>,

    /// Caddy's admin API: http://HOST:PORT or unix:/path/to/admin.sock.
    #[arg(
        long,
        env = "HARBOR_CADDY_ADMIN",
        value_name = "URL",
        help_heading = "Caddy"
    )]
    pub caddy_admin: Option<BaseUrl>,

    /// Where Harbor's Caddy server listens when Caddy has none there yet.
    #[arg(
        long,
        env = "HARBOR_CADDY_LISTEN",
        value_name = "ADDR",
        help_heading = "Caddy"
    )]
    pub caddy_listen: Option<SocketAddr>,

    /// Caddy's HTTPS server, by its listen address: Harbor's hosts are served there with
    /// Caddy's automatic HTTPS, and plain HTTP to them is redirected. Harbor creates the server
    /// when Caddy has none there. Without it Harbor's hosts are plain HTTP in Caddy.
    #[arg(
        long,
        env = "HARBOR_CADDY_TLS_LISTEN",
        value_name = "ADDR",
        help_heading = "Caddy"
    )]
    pub caddy_tls_listen: Option<SocketAddr>,

    /// Where Harbor's DNS responder for Caddy's dynamic upstreams listens. [default: where it
    /// listened last (kept in the state directory), else a free loopback port]
    #[arg(
        long,
        env = "HARBOR_DNS_LISTEN",
        value_name = "ADDR",
        help_heading = "Caddy"
    )]
    pub dns_listen: Option<SocketAddr>,

    /// Directory of Envoy's dynamic configuration files. [default: STATE_DIR/envoy]
    #[arg(
        long,
        env = "HARBOR_ENVOY_DIR",
        value_name = "DIR",
        help_heading = "Envoy"
    )]
    pub envoy_dir: Option<PathBuf>,

    /// Envoy's admin address: http://HOST:PORT or unix:/path.
    #[arg(
        long,
        env = "HARBOR_ENVOY_ADMIN",
        value_name = "URL",
        help_heading = "Envoy"
    )]
    pub envoy_admin: Option<BaseUrl>,

    /// Log format.
    #[arg(long, env = "HARBOR_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    #[command(flatten)]
    #[serde(flatten)]
    pub proxy: ProxyArgs,
}

/// The embedded proxy's knobs (its HTTP listener aside).
#[derive(Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Proxy")]
pub struct ProxyArgs {
    /// Longest wait for a TCP connection to an upstream before trying another.
    #[arg(long, env = "HARBOR_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub connect_timeout: Option<Duration>,

    /// Longest wait for an upstream's response headers, counted from the end of the request,
    /// before answering 504.
    #[arg(long, env = "HARBOR_UPSTREAM_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub upstream_timeout: Option<Duration>,

    /// A response body that stops arriving for this long is cut and its client connection
    /// closed.
    #[arg(long, env = "HARBOR_UPSTREAM_IDLE_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub upstream_idle_timeout: Option<Duration>,

    /// Longest a client may take to send a request's head once it has begun (or, on a new
    /// connection, once connected); a head begun and not finished is answered 408.
    #[arg(long, env = "HARBOR_HEADER_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub header_timeout: Option<Duration>,

    /// A request body that stops arriving for this long is answered 408; a steady upload of any
    /// length goes through.
    #[arg(long, env = "HARBOR_BODY_IDLE_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub body_idle_timeout: Option<Duration>,

    /// An HTTP client connection idle between requests for this long is closed.
    #[arg(long, env = "HARBOR_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub keepalive_timeout: Option<Duration>,

    /// Largest request head (request line and header fields) a client may send, in bytes;
    /// a longer one is answered 431.
    #[arg(long, env = "HARBOR_MAX_HEADER_BYTES", value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,

    /// Client HTTP connections open at once; more are closed at once, and counted.
    #[arg(long, env = "HARBOR_MAX_HTTP_CONNECTIONS", value_name = "N")]
    pub max_http_connections: Option<usize>,

    /// Other upstreams tried after a failed connect, per request or connection.
    #[arg(long, env = "HARBOR_RETRIES", value_name = "N")]
    pub retries: Option<u32>,

    /// How long an upstream that refused a connection gets no new work.
    #[arg(long, env = "HARBOR_COOLDOWN", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub cooldown: Option<Duration>,

    /// A TCP connection with no traffic either way for this long is closed.
    #[arg(long, env = "HARBOR_TCP_IDLE_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub tcp_idle_timeout: Option<Duration>,

    /// TCP connections in flight across all tcp routes; more are closed at once.
    #[arg(long, env = "HARBOR_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// On shutdown, how long open connections may finish before they are cut.
    #[arg(long, env = "HARBOR_SHUTDOWN_GRACE", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub shutdown_grace: Option<Duration>,

    /// Relay TCP through 64 KiB user-space buffers instead of zero-copy splice(2).
    #[arg(long, env = "HARBOR_NO_SPLICE")]
    #[serde(rename = "splice", serialize_with = "off_if_given")]
    pub no_splice: bool,

    /// Serve every HTTP request through the full HTTP stack, without the direct HTTP/1.1 path
    /// for plain requests (to compare the two).
    #[arg(long, env = "HARBOR_NO_DIRECT_HTTP1")]
    #[serde(rename = "direct_http1", serialize_with = "off_if_given")]
    pub no_direct_http1: bool,

    /// Let the scheduler place the HTTP proxy's threads instead of giving each a core of its
    /// own (for machines where other pinned work owns some cores).
    #[arg(long, env = "HARBOR_NO_CPU_AFFINITY")]
    #[serde(rename = "cpu_affinity", serialize_with = "off_if_given")]
    pub no_cpu_affinity: bool,

    /// Also run demo echo backends on these addresses (see `harbor echo`).
    #[arg(
        long,
        env = "HARBOR_ECHO",
        value_name = "ADDR",
        value_delimiter = ',',
        help_heading = "Demo"
    )]
    pub echo: Vec<SocketAddr>,
}

#[derive(ValueEnum, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Harbor is the proxy.
    #[default]
    Embedded,
    /// Drive Caddy through its admin API.
    Caddy,
    /// Drive Envoy through dynamic configuration files.
    Envoy,
}

#[derive(ValueEnum, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Embedded => "embedded",
            BackendKind::Caddy => "caddy",
            BackendKind::Envoy => "envoy",
        })
    }
}

/// Where an API listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/harbor/api.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("{s:?} is neither ADDR:PORT nor unix:/path"))
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => a.fmt(f),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A negative flag (`--no-watch`) as its file key (`watch`): `false` when the flag is given,
/// nothing when it is not.
fn on_if_given<S: Serializer>(given: &bool, s: S) -> Result<S::Ok, S::Error> {
    if *given {
        s.serialize_some(&true)
    } else {
        s.serialize_none()
    }
}

fn off_if_given<S: Serializer>(given: &bool, s: S) -> Result<S::Ok, S::Error> {
    if *given {
        s.serialize_some(&false)
    } else {
        s.serialize_none()
    }
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for BaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The settings' own formats, read and written as a person writes them in the file.
mod written {
    /// A duration as people write it (`30s`, `10m`); a flag's parsed value reads back too.
    pub mod duration {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Text(String),
            Given { secs: u64, nanos: u32 },
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            match Written::deserialize(d)? {
                Written::Text(raw) => humantime::parse_duration(&raw)
                    .map_err(|e| serde::de::Error::custom(format!("{raw:?}: {e}"))),
                Written::Given { secs, nanos } => Ok(Duration::new(secs, nanos)),
            }
        }

        pub fn serialize<S: Serializer>(every: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(&humantime::format_duration(*every))
        }
    }

    /// A duration where zero turns the thing off.
    pub mod duration_or_off {
        use std::time::Duration;

        use serde::{Deserializer, Serializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::duration::deserialize(d).map(|every| (!every.is_zero()).then_some(every))
        }

        pub fn serialize<S: Serializer>(every: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            super::duration::serialize(&every.unwrap_or_default(), s)
        }
    }
}

/// The lease bounds as the file and flags name them.
#[derive(Deserialize, Serialize)]
#[serde(default)]
struct LeaseKeys {
    #[serde(with = "written::duration")]
    ttl_min: Duration,
    #[serde(with = "written::duration")]
    ttl_max: Duration,
    #[serde(with = "written::duration")]
    ttl_default: Duration,
}

impl From<LeaseLimits> for LeaseKeys {
    fn from(l: LeaseLimits) -> Self {
        Self {
            ttl_min: l.min,
            ttl_max: l.max,
            ttl_default: l.default,
        }
    }
}

impl Default for LeaseKeys {
    fn default() -> Self {
        LeaseLimits::default().into()
    }
}

impl<'de> Deserialize<'de> for LeaseLimits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let k = LeaseKeys::deserialize(d)?;
        Ok(LeaseLimits {
            min: k.ttl_min,
            max: k.ttl_max,
            default: k.ttl_default,
        })
    }
}

impl Serialize for LeaseLimits {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        LeaseKeys::from(*self).serialize(s)
    }
}

/// The daemon's settings, resolved and checked. See [`RunArgs`] for what each means; a field
/// takes its value from the key of the same name (`routes` and `plugins` for the directories).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    #[serde(rename = "routes")]
    pub routes_dir: PathBuf,
    pub state_dir: PathBuf,
    pub api: Vec<ListenAddr>,
    pub backend: BackendKind,
    pub proxy_listen: SocketAddr,
    /// Where the embedded proxy or Envoy serves HTTPS; none: no TLS there.
    pub tls_listen: Option<SocketAddr>,
    pub acme_directory: String,
    pub acme_email: Option<String>,
    pub acme_ca_root: Option<PathBuf>,
    pub acme_challenge: crate::tls::acme::Challenge,
    #[serde(with = "written::duration")]
    pub acme_renew_before: Duration,
    /// The first wait after a failed ACME order (doubling, up to a day).
    #[serde(skip)]
    pub acme_retry: Duration,
    /// Where Gangway alone is served, besides `/` on every API listener.
    pub gangway_listen: Option<SocketAddr>,
    #[serde(rename = "plugins")]
    pub plugins_dir: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// Whether reads need a token too.
    pub protect_reads: bool,
    /// Connections the API listeners take at once (and Gangway's, apart).
    pub api_max_connections: usize,
    /// From `ttl_min`, `ttl_max` and `ttl_default`.
    #[serde(skip)]
    pub lease: LeaseLimits,
    #[serde(with = "written::duration_or_off")]
    pub rescan_interval: Option<Duration>,
    pub watch: bool,
    pub max_body: usize,
    pub log_format: LogFormat,
    pub caddy_admin: BaseUrl,
    pub caddy_listen: SocketAddr,
    /// Caddy's HTTPS server for Harbor's hosts; none: plain HTTP only in Caddy.
    pub caddy_tls_listen: Option<SocketAddr>,
    pub dns_listen: Option<SocketAddr>,
    pub envoy_dir: PathBuf,
    pub envoy_admin: BaseUrl,
    /// Events kept for clients that resume a stream.
    #[serde(skip)]
    pub event_ring: usize,
    /// How often an idle event stream gets a keep-alive comment.
    #[serde(skip)]
    pub sse_keep_alive: Duration,
    /// From the same keys, read on their own.
    #[serde(skip)]
    pub proxy: ProxySettings,
}

/// The largest `--max-header-bytes`: HAProxy's default buffer is 16 KiB, nginx's largest header
/// buffers 32 KiB; a head past 1 MiB is an attack, not a request.
pub const MAX_HEADER_BYTES: usize = 1024 * 1024;

/// See [`ProxyArgs`] for what each setting means.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ProxySettings {
    #[serde(with = "written::duration")]
    pub connect_timeout: Duration,
    #[serde(with = "written::duration")]
    pub upstream_timeout: Duration,
    #[serde(with = "written::duration")]
    pub upstream_idle_timeout: Duration,
    #[serde(with = "written::duration")]
    pub header_timeout: Duration,
    #[serde(with = "written::duration")]
    pub body_idle_timeout: Duration,
    #[serde(with = "written::duration")]
    pub keepalive_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_http_connections: usize,
    pub retries: u32,
    #[serde(with = "written::duration")]
    pub cooldown: Duration,
    #[serde(with = "written::duration")]
    pub tcp_idle_timeout: Duration,
    pub max_connections: usize,
    #[serde(with = "written::duration")]
    pub shutdown_grace: Duration,
    pub splice: bool,
    /// Plain HTTP/1.1 requests take the direct path (see `proxy::h1`).
    pub direct_http1: bool,
    /// Each HTTP lane is bound to a core of its own (see `proxy::lanes::Affinity`).
    pub cpu_affinity: bool,
    pub echo: Vec<SocketAddr>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            upstream_timeout: Duration::from_secs(60),
            upstream_idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_http_connections: 10_000,
            retries: 2,
            cooldown: Duration::from_secs(10),
            tcp_idle_timeout: Duration::from_secs(600),
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(10),
            splice: true,
            direct_http1: true,
            cpu_affinity: true,
            echo: Vec::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new("/etc/harbor/routes.d", "/var/lib/harbor")
    }
}

impl Config {
    /// Defaults with the given directories; the starting point for tests and embedding.
    pub fn new(routes_dir: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        Self {
            routes_dir: routes_dir.into(),
            envoy_dir: state_dir.join("envoy"),
            state_dir,
            api: vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 7070)))],
            backend: BackendKind::Embedded,
            proxy_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_listen: None,
            acme_directory: crate::tls::acme::LETS_ENCRYPT.to_owned(),
            acme_email: None,
            acme_ca_root: None,
            acme_challenge: crate::tls::acme::Challenge::default(),
            acme_renew_before: Duration::from_secs(30 * 24 * 3600),
            acme_retry: Duration::from_secs(60),
            gangway_listen: None,
            plugins_dir: None,
            token_file: None,
            protect_reads: false,
            api_max_connections: 1024,
            lease: LeaseLimits::default(),
            rescan_interval: Some(Duration::from_secs(30)),
            watch: true,
            max_body: 64 * 1024,
            log_format: LogFormat::Text,
            caddy_admin: BaseUrl::tcp("127.0.0.1:2019"),
            caddy_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            caddy_tls_listen: None,
            dns_listen: None,
            envoy_admin: BaseUrl::tcp("127.0.0.1:9901"),
            event_ring: 4096,
            sse_keep_alive: Duration::from_secs(15),
            proxy: ProxySettings::default(),
        }
    }

    /// The settings from the flags (and the environment, which clap reads for them) laid over
    /// the config file's, over the defaults.
    pub fn from_args(args: RunArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => serde_json::Map::new(),
        };
        let source = args.config.as_deref().map_or_else(
            || "the flags".to_owned(),
            |p| format!("the config file {}", p.display()),
        );
        let flags = serde_json::to_value(&args).context("cannot read the flags")?;
        let serde_json::Value::Object(flags) = flags else {
            bail!("the flags are not a set of settings");
        };
        if let Some(unknown) = file.keys().find(|key| !flags.contains_key(*key)) {
            bail!(
                "in {source}: unknown setting {unknown:?} (settings are the flags' names with _)"
            );
        }
        let mut layers = file;
        for (key, value) in flags {
            let given = match &value {
                serde_json::Value::Null => false,
                serde_json::Value::Array(list) => !list.is_empty(),
                _ => true,
            };
            if given {
                layers.insert(key, value);
            }
        }
        // The one default that follows another setting.
        let envoy_dir_given = layers.contains_key("envoy_dir");
        let layers = serde_json::Value::Object(layers);
        // Each part reads the keys it knows from the same layers, so that an error names its
        // key (serde loses the path inside flattened parts).
        let mut c: Config = read_settings(&layers, &source)?;
        c.proxy = read_settings(&layers, &source)?;
        c.lease = read_settings(&layers, &source)?;
        if !envoy_dir_given {
            c.envoy_dir = c.state_dir.join("envoy");
        }
        c.validate()?;
        Ok(c)
    }

    /// The settings under the keys the file and the flags use, each value written as the file
    /// would have it.
    pub fn keys(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut keys = serde_json::Map::new();
        // These parts are plain structs of strings, numbers and lists: they always serialize.
        let parts = [
            serde_json::to_value(self),
            serde_json::to_value(&self.proxy),
            serde_json::to_value(self.lease),
        ];
        for part in parts {
            if let Ok(serde_json::Value::Object(part)) = part {
                keys.extend(part);
            }
        }
        keys
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.api_max_connections == 0 {
            bail!("--api-max-connections must be at least 1");
        }
        if self.protect_reads && self.token_file.is_none() {
            bail!("--protect-reads needs --token-file: without tokens no one could read");
        }
        // Port 0 asks for any free port, twice over.
        if self.tls_listen == Some(self.proxy_listen) && self.proxy_listen.port() != 0 {
            bail!(
                "--tls-listen ({}) must differ from --proxy-listen, the plain HTTP listener",
                self.proxy_listen
            );
        }
        if let Some(tls) = self.caddy_tls_listen
            && tls == self.caddy_listen
        {
            bail!(
                "--caddy-tls-listen ({tls}) must differ from --caddy-listen, Caddy's plain HTTP server"
            );
        }
        let l = &self.lease;
        if l.min.is_zero() || l.min > l.max {
            bail!(
                "lease bounds: --ttl-min ({}) must be above zero and at most --ttl-max ({})",
                humantime::format_duration(l.min),
                humantime::format_duration(l.max)
            );
        }
        if l.default < l.min || l.default > l.max {
            bail!(
                "--ttl-default ({}) must lie within --ttl-min and --ttl-max",
                humantime::format_duration(l.default)
            );
        }
        if self.api.is_empty() {
            bail!("at least one --api listener is needed");
        }
        if self.max_body < 1024 {
            bail!("--max-body must be at least 1024 bytes");
        }
        let p = &self.proxy;
        for (flag, timeout) in [
            ("--connect-timeout", p.connect_timeout),
            ("--upstream-timeout", p.upstream_timeout),
            ("--upstream-idle-timeout", p.upstream_idle_timeout),
            ("--header-timeout", p.header_timeout),
            ("--body-idle-timeout", p.body_idle_timeout),
            ("--keepalive-timeout", p.keepalive_timeout),
        ] {
            if timeout.is_zero() {
                bail!("{flag} must be above zero");
            }
        }
        if !(1024..=MAX_HEADER_BYTES).contains(&p.max_header_bytes) {
            bail!("--max-header-bytes must be between 1024 and {MAX_HEADER_BYTES}");
        }
        if p.max_http_connections == 0 {
            bail!("--max-http-connections must be at least 1");
        }
        if p.tcp_idle_timeout.is_zero() {
            bail!("--tcp-idle-timeout must be above zero");
        }
        if p.max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        if p.retries > 16 {
            bail!("--retries is at most 16");
        }
        Ok(())
    }
}

/// Settings of type `T` from `layers`; an error names the key and where it came from.
fn read_settings<T: serde::de::DeserializeOwned>(
    layers: &serde_json::Value,
    source: &str,
) -> anyhow::Result<T> {
    serde_path_to_error::deserialize(layers.clone())
        .map_err(|e| anyhow::anyhow!("in {source}: {}: {}", e.path(), e.inner()))
}

/// The config file's keys and values.
fn load_file(path: &Path) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("in the config file {}", path.display()))?;
    match serde_json::to_value(table)? {
        serde_json::Value::Object(keys) => Ok(keys),
        _ => bail!("the config file {} is not a table", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("harbor.toml");
        std::fs::write(
            &file,
            "routes = \"/srv/routes\"\napi = [\"127.0.0.1:9000\", \"unix:/tmp/h.sock\"]\nttl_max = \"1h\"\nwatch = false\ncpu_affinity = false\ngangway_listen = \"127.0.0.1:7071\"\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(file),
            routes: Some("/other".into()),
            ..RunArgs::default()
        };
        let c = Config::from_args(args).unwrap();
        assert_eq!(c.routes_dir, PathBuf::from("/other"));
        assert_eq!(c.api[1], ListenAddr::Unix("/tmp/h.sock".into()));
        assert_eq!(c.lease.max, Duration::from_secs(3600));
        assert!(!c.watch);
        assert!(!c.proxy.cpu_affinity);
        assert!(
            ProxySettings::default().cpu_affinity,
            "lanes are bound unless told otherwise"
        );
        assert_eq!(c.gangway_listen, Some("127.0.0.1:7071".parse().unwrap()));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/harbor"));
    }

    #[test]
    fn negative_flags_durations_and_derived_defaults_layer_like_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("harbor.toml");
        std::fs::write(
            &file,
            "state_dir = \"/srv/state\"\nsplice = true\nwatch = true\nrescan_interval = \"0s\"\n\
             upstream_timeout = \"5s\"\nconnect_timeout = \"2s\"\nmax_http_connections = 7\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "harbor",
            "--config",
            file.to_str().unwrap(),
            "--no-splice",
            "--upstream-timeout",
            "9s",
            "--caddy-admin",
            "unix:/run/caddy/admin.sock",
            "--api",
            "127.0.0.1:0,unix:/tmp/a.sock",
            "--backend",
            "envoy",
        ])
        .unwrap();
        let c = Config::from_args(cli.run).unwrap();
        assert_eq!(c.caddy_admin.to_string(), "unix:/run/caddy/admin.sock");
        assert_eq!(c.api[1], ListenAddr::Unix("/tmp/a.sock".into()));
        assert_eq!(c.backend, BackendKind::Envoy);
        assert!(!c.proxy.splice, "a negative flag wins over the file");
        assert!(c.watch, "the file's value stands where no flag is given");
        assert_eq!(c.proxy.upstream_timeout, Duration::from_secs(9), "flag");
        assert_eq!(c.proxy.connect_timeout, Duration::from_secs(2), "file");
        assert_eq!(c.proxy.max_http_connections, 7);
        assert_eq!(c.rescan_interval, None, "0s turns rescans off");
        assert_eq!(
            c.envoy_dir,
            PathBuf::from("/srv/state/envoy"),
            "follows state_dir"
        );
        assert_eq!(
            c.proxy.header_timeout,
            ProxySettings::default().header_timeout,
            "named nowhere: the default"
        );

        let defaults = Config::from_args(RunArgs::default()).unwrap();
        assert!(defaults.watch && defaults.proxy.splice && defaults.proxy.direct_http1);
        assert_eq!(defaults.rescan_interval, Some(Duration::from_secs(30)));
        assert_eq!(defaults.routes_dir, PathBuf::from("/etc/harbor/routes.d"));
        assert_eq!(defaults.envoy_dir, PathBuf::from("/var/lib/harbor/envoy"));

        std::fs::write(&file, "ttl_max = \"forever\"\n").unwrap();
        let err = Config::from_args(RunArgs {
            config: Some(file),
            ..RunArgs::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("ttl_max") && err.to_string().contains("forever"),
            "{err}"
        );
    }

    #[test]
    fn the_defaults_written_as_a_file_read_back_as_the_defaults() {
        let defaults = Config::default().keys();
        let written: toml::Table = defaults
            .iter()
            .filter(|(_, value)| !value.is_null())
            .map(|(key, value)| (key.clone(), serde_json::from_value(value.clone()).unwrap()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("harbor.toml");
        std::fs::write(&file, toml::to_string(&written).unwrap()).unwrap();
        let read = Config::from_args(RunArgs {
            config: Some(file),
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(read.keys(), defaults);
    }

    #[test]
    fn the_help_shows_each_group_and_the_defaults_that_apply() {
        let help = Cli::command_with_defaults().render_long_help().to_string();
        for group in [
            "API:",
            "Routes and leases:",
            "Proxy:",
            "Caddy:",
            "Envoy:",
            "Plugins:",
            "TLS:",
            "Demo:",
        ] {
            assert!(help.contains(group), "no {group} group in\n{help}");
        }
        let proxy = ProxySettings::default();
        for (flag, default) in [
            (
                "--connect-timeout",
                humantime::format_duration(proxy.connect_timeout).to_string(),
            ),
            ("--max-header-bytes", proxy.max_header_bytes.to_string()),
            ("--api", "127.0.0.1:7070".to_owned()),
        ] {
            let from = help.find(&format!("{flag} <")).unwrap();
            let to = help[from..].find("[env:").unwrap();
            assert!(
                help[from..from + to].contains(&format!("[default: {default}]")),
                "{}",
                &help[from..from + to]
            );
        }
        let ungrouped = Cli::command()
            .get_arguments()
            .filter(|arg| arg.get_help_heading().is_none())
            .map(|arg| arg.get_id().to_string())
            .collect::<Vec<_>>();
        assert_eq!(
            ungrouped,
            ["config", "log_format"],
            "every setting has a group"
        );
    }

    #[test]
    fn bad_config_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("harbor.toml");
        std::fs::write(&file, "routs = \"/x\"\n").unwrap();
        let err = Config::from_args(RunArgs {
            config: Some(file),
            ..RunArgs::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("routs"), "{err:#}");

        let err = Config::from_args(RunArgs {
            ttl_min: Some(Duration::from_secs(10)),
            ttl_max: Some(Duration::from_secs(5)),
            ..RunArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("ttl-min"), "{err}");

        let err = Config::from_args(RunArgs {
            caddy_tls_listen: Some("127.0.0.1:8080".parse().unwrap()),
            backend: Some(BackendKind::Caddy),
            ..RunArgs::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("must differ from --caddy-listen"),
            "{err}"
        );

        let err = Config::from_args(RunArgs {
            tls_listen: Some("127.0.0.1:8080".parse().unwrap()),
            proxy_listen: Some("127.0.0.1:8080".parse().unwrap()),
            backend: Some(BackendKind::Envoy),
            ..RunArgs::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("must differ from --proxy-listen"),
            "{err}"
        );
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "harbor",
            "--api",
            "127.0.0.1:0,unix:/tmp/a.sock",
            "--backend",
            "caddy",
            "--ttl-max",
            "2h",
            "--gangway-listen",
            "0.0.0.0:7071",
            "--caddy-admin",
            "unix:/run/caddy/admin.sock",
        ])
        .unwrap();
        assert!(cli.run.caddy_admin.is_some());
        assert!(Cli::try_parse_from(["harbor", "--caddy-admin", "127.0.0.1:2019"]).is_err());
        assert_eq!(cli.run.api.len(), 2);
        assert_eq!(
            cli.run.gangway_listen,
            Some("0.0.0.0:7071".parse().unwrap())
        );
        assert_eq!(cli.run.backend, Some(BackendKind::Caddy));
        assert!(Cli::try_parse_from(["harbor", "--api", "nowhere"]).is_err());
    }
}
