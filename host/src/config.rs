//! Configuration: command-line flags, each also settable from a `HARBOR_*` environment variable,
//! over an optional TOML file, over defaults. The result is one validated [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

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
    /// harbor:strategy@0.4.0, describe itself and answer sample picks within its deadline.
    Check {
        /// The component (.wasm) to check.
        file: PathBuf,
    },
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, env = "HARBOR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Directory of .route files, followed live. [default: /etc/harbor/routes.d]
    #[arg(
        long,
        env = "HARBOR_ROUTES",
        value_name = "DIR",
        help_heading = "Routes and leases"
    )]
    pub routes: Option<PathBuf>,

    /// Where ephemeral registrations are kept across restarts. [default: /var/lib/harbor]
    #[arg(
        long,
        env = "HARBOR_STATE_DIR",
        value_name = "DIR",
        help_heading = "Routes and leases"
    )]
    pub state_dir: Option<PathBuf>,

    /// API listener: ADDR:PORT or unix:/path/to.sock; repeat or comma-separate for several.
    /// [default: 127.0.0.1:7070]
    #[arg(
        long,
        env = "HARBOR_API",
        value_name = "ADDR",
        value_delimiter = ',',
        help_heading = "API"
    )]
    pub api: Vec<ListenAddr>,

    /// Which proxy Harbor drives. [default: embedded]
    #[arg(long, env = "HARBOR_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,

    /// Where the embedded HTTP proxy listens. [default: 127.0.0.1:8080]
    #[arg(
        long,
        env = "HARBOR_PROXY_LISTEN",
        value_name = "ADDR",
        help_heading = "Proxy"
    )]
    pub proxy_listen: Option<SocketAddr>,

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

    /// Bearer tokens for mutating API calls, one per line: `TOKEN [SERVICE-PREFIX]`.
    #[arg(
        long,
        env = "HARBOR_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "API"
    )]
    pub token_file: Option<PathBuf>,

    /// Shortest lease a registration may ask for. [default: 1s]
    #[arg(long, env = "HARBOR_TTL_MIN", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Routes and leases")]
    pub ttl_min: Option<Duration>,

    /// Longest lease a registration may ask for. [default: 24h]
    #[arg(long, env = "HARBOR_TTL_MAX", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Routes and leases")]
    pub ttl_max: Option<Duration>,

    /// Lease given when a registration names no TTL. [default: 30s]
    #[arg(long, env = "HARBOR_TTL_DEFAULT", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Routes and leases")]
    pub ttl_default: Option<Duration>,

    /// Re-read the routes directory this often even without change events; 0 turns it off.
    /// [default: 30s]
    #[arg(long, env = "HARBOR_RESCAN_INTERVAL", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Routes and leases")]
    pub rescan_interval: Option<Duration>,

    /// Do not watch the routes directory for changes (rely on rescans and SIGHUP).
    #[arg(long, env = "HARBOR_NO_WATCH", help_heading = "Routes and leases")]
    pub no_watch: bool,

    /// Largest API request body, in bytes. [default: 65536]
    #[arg(
        long,
        env = "HARBOR_MAX_BODY",
        value_name = "BYTES",
        help_heading = "API"
    )]
    pub max_body: Option<usize>,

    /// Caddy's admin API: http://HOST:PORT or unix:/path/to/admin.sock.
    /// [default: http://127.0.0.1:2019]
    #[arg(
        long,
        env = "HARBOR_CADDY_ADMIN",
        value_name = "URL",
        help_heading = "Caddy"
    )]
    pub caddy_admin: Option<BaseUrl>,

    /// Where Harbor's Caddy server listens when Caddy has none there yet.
    /// [default: 127.0.0.1:8080]
    #[arg(
        long,
        env = "HARBOR_CADDY_LISTEN",
        value_name = "ADDR",
        help_heading = "Caddy"
    )]
    pub caddy_listen: Option<SocketAddr>,

    /// Directory of Envoy's dynamic configuration files. [default: STATE_DIR/envoy]
    #[arg(
        long,
        env = "HARBOR_ENVOY_DIR",
        value_name = "DIR",
        help_heading = "Envoy"
    )]
    pub envoy_dir: Option<PathBuf>,

    /// Envoy's admin address: http://HOST:PORT or unix:/path. [default: http://127.0.0.1:9901]
    #[arg(
        long,
        env = "HARBOR_ENVOY_ADMIN",
        value_name = "URL",
        help_heading = "Envoy"
    )]
    pub envoy_admin: Option<BaseUrl>,

    /// Log format. [default: text]
    #[arg(long, env = "HARBOR_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// The embedded proxy's knobs (its HTTP listener aside).
#[derive(Args, Debug, Default)]
#[command(next_help_heading = "Proxy")]
pub struct ProxyArgs {
    /// Longest wait for a TCP connection to an upstream before trying another. [default: 3s]
    #[arg(long, env = "HARBOR_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub connect_timeout: Option<Duration>,

    /// Longest wait for an upstream's response headers, counted from the end of the request,
    /// before answering 504. [default: 60s]
    #[arg(long, env = "HARBOR_UPSTREAM_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub upstream_timeout: Option<Duration>,

    /// A response body that stops arriving for this long is cut and its client connection
    /// closed. [default: 60s]
    #[arg(long, env = "HARBOR_UPSTREAM_IDLE_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub upstream_idle_timeout: Option<Duration>,

    /// Longest a client may take to send a request's head once it has begun (or, on a new
    /// connection, once connected); a head begun and not finished is answered 408.
    /// [default: 30s]
    #[arg(long, env = "HARBOR_HEADER_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub header_timeout: Option<Duration>,

    /// A request body that stops arriving for this long is answered 408; a steady upload of any
    /// length goes through. [default: 60s]
    #[arg(long, env = "HARBOR_BODY_IDLE_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub body_idle_timeout: Option<Duration>,

    /// An HTTP client connection idle between requests for this long is closed. [default: 60s]
    #[arg(long, env = "HARBOR_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub keepalive_timeout: Option<Duration>,

    /// Largest request head (request line and header fields) a client may send, in bytes;
    /// a longer one is answered 431. [default: 65536]
    #[arg(long, env = "HARBOR_MAX_HEADER_BYTES", value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,

    /// Client HTTP connections open at once; more are closed at once, and counted.
    /// [default: 10000]
    #[arg(long, env = "HARBOR_MAX_HTTP_CONNECTIONS", value_name = "N")]
    pub max_http_connections: Option<usize>,

    /// Other upstreams tried after a failed connect, per request or connection. [default: 2]
    #[arg(long, env = "HARBOR_RETRIES", value_name = "N")]
    pub retries: Option<u32>,

    /// How long an upstream that refused a connection gets no new work. [default: 10s]
    #[arg(long, env = "HARBOR_COOLDOWN", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub cooldown: Option<Duration>,

    /// A TCP connection with no traffic either way for this long is closed. [default: 10m]
    #[arg(long, env = "HARBOR_TCP_IDLE_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub tcp_idle_timeout: Option<Duration>,

    /// TCP connections in flight across all tcp routes; more are closed at once. [default: 10000]
    #[arg(long, env = "HARBOR_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// On shutdown, how long open connections may finish before they are cut. [default: 10s]
    #[arg(long, env = "HARBOR_SHUTDOWN_GRACE", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub shutdown_grace: Option<Duration>,

    /// Relay TCP through 64 KiB user-space buffers instead of zero-copy splice(2).
    #[arg(long, env = "HARBOR_NO_SPLICE")]
    pub no_splice: bool,

    /// Serve every HTTP request through the full HTTP stack, without the direct HTTP/1.1 path
    /// for plain requests (to compare the two).
    #[arg(long, env = "HARBOR_NO_DIRECT_HTTP1")]
    pub no_direct_http1: bool,

    /// Let the scheduler place the HTTP proxy's threads instead of giving each a core of its
    /// own (for machines where other pinned work owns some cores).
    #[arg(long, env = "HARBOR_NO_CPU_AFFINITY")]
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

#[derive(ValueEnum, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
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

#[derive(ValueEnum, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
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

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => a.fmt(f),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The config file: the same settings as the flags.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    routes: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    api: Option<Vec<ListenAddr>>,
    backend: Option<BackendKind>,
    proxy_listen: Option<SocketAddr>,
    gangway_listen: Option<SocketAddr>,
    plugins: Option<PathBuf>,
    token_file: Option<PathBuf>,
    #[serde(default, with = "opt_duration")]
    ttl_min: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    ttl_max: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    ttl_default: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    rescan_interval: Option<Duration>,
    watch: Option<bool>,
    max_body: Option<usize>,
    log_format: Option<LogFormat>,
    #[serde(default, with = "opt_duration")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    upstream_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    upstream_idle_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    header_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    body_idle_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    keepalive_timeout: Option<Duration>,
    max_header_bytes: Option<usize>,
    max_http_connections: Option<usize>,
    retries: Option<u32>,
    #[serde(default, with = "opt_duration")]
    cooldown: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    tcp_idle_timeout: Option<Duration>,
    max_connections: Option<usize>,
    #[serde(default, with = "opt_duration")]
    shutdown_grace: Option<Duration>,
    splice: Option<bool>,
    direct_http1: Option<bool>,
    cpu_affinity: Option<bool>,
    echo: Option<Vec<SocketAddr>>,
    caddy_admin: Option<BaseUrl>,
    caddy_listen: Option<SocketAddr>,
    envoy_dir: Option<PathBuf>,
    envoy_admin: Option<BaseUrl>,
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

mod opt_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let raw = String::deserialize(d)?;
        humantime::parse_duration(&raw)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{raw:?}: {e}")))
    }
}

/// The daemon's settings, resolved and checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub routes_dir: PathBuf,
    pub state_dir: PathBuf,
    pub api: Vec<ListenAddr>,
    pub backend: BackendKind,
    pub proxy_listen: SocketAddr,
    /// Where Gangway alone is served, besides `/` on every API listener.
    pub gangway_listen: Option<SocketAddr>,
    pub plugins_dir: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub lease: LeaseLimits,
    pub rescan_interval: Option<Duration>,
    pub watch: bool,
    pub max_body: usize,
    pub log_format: LogFormat,
    pub caddy_admin: BaseUrl,
    pub caddy_listen: SocketAddr,
    pub envoy_dir: PathBuf,
    pub envoy_admin: BaseUrl,
    /// Events kept for clients that resume a stream.
    pub event_ring: usize,
    /// Longest a change waits before the state file is rewritten.
    pub state_flush: Duration,
    /// How often an idle event stream gets a keep-alive comment.
    pub sse_keep_alive: Duration,
    pub proxy: ProxySettings,
}

/// The largest `--max-header-bytes`: HAProxy's default buffer is 16 KiB, nginx's largest header
/// buffers 32 KiB; a head past 1 MiB is an attack, not a request.
pub const MAX_HEADER_BYTES: usize = 1024 * 1024;

/// See [`ProxyArgs`] for what each setting means.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub header_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_http_connections: usize,
    pub retries: u32,
    pub cooldown: Duration,
    pub tcp_idle_timeout: Duration,
    pub max_connections: usize,
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
            gangway_listen: None,
            plugins_dir: None,
            token_file: None,
            lease: LeaseLimits::default(),
            rescan_interval: Some(Duration::from_secs(30)),
            watch: true,
            max_body: 64 * 1024,
            log_format: LogFormat::Text,
            caddy_admin: BaseUrl::tcp("127.0.0.1:2019"),
            caddy_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            envoy_admin: BaseUrl::tcp("127.0.0.1:9901"),
            event_ring: 4096,
            state_flush: Duration::from_millis(500),
            sse_keep_alive: Duration::from_secs(15),
            proxy: ProxySettings::default(),
        }
    }

    pub fn from_args(args: RunArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let mut c = Config::new(
            args.routes
                .or(file.routes)
                .unwrap_or_else(|| "/etc/harbor/routes.d".into()),
            args.state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| "/var/lib/harbor".into()),
        );
        if !args.api.is_empty() {
            c.api = args.api;
        } else if let Some(api) = file.api {
            c.api = api;
        }
        c.backend = args.backend.or(file.backend).unwrap_or_default();
        c.proxy_listen = args
            .proxy_listen
            .or(file.proxy_listen)
            .unwrap_or(c.proxy_listen);
        c.gangway_listen = args.gangway_listen.or(file.gangway_listen);
        c.plugins_dir = args.plugins.or(file.plugins);
        c.token_file = args.token_file.or(file.token_file);
        c.lease.min = args.ttl_min.or(file.ttl_min).unwrap_or(c.lease.min);
        c.lease.max = args.ttl_max.or(file.ttl_max).unwrap_or(c.lease.max);
        c.lease.default = args
            .ttl_default
            .or(file.ttl_default)
            .unwrap_or(c.lease.default);
        if let Some(every) = args.rescan_interval.or(file.rescan_interval) {
            c.rescan_interval = (!every.is_zero()).then_some(every);
        }
        c.watch = !args.no_watch && file.watch.unwrap_or(true);
        c.max_body = args.max_body.or(file.max_body).unwrap_or(c.max_body);
        c.log_format = args.log_format.or(file.log_format).unwrap_or_default();
        let (a, p) = (args.proxy, &mut c.proxy);
        p.connect_timeout = a
            .connect_timeout
            .or(file.connect_timeout)
            .unwrap_or(p.connect_timeout);
        p.upstream_timeout = a
            .upstream_timeout
            .or(file.upstream_timeout)
            .unwrap_or(p.upstream_timeout);
        p.upstream_idle_timeout = a
            .upstream_idle_timeout
            .or(file.upstream_idle_timeout)
            .unwrap_or(p.upstream_idle_timeout);
        p.header_timeout = a
            .header_timeout
            .or(file.header_timeout)
            .unwrap_or(p.header_timeout);
        p.body_idle_timeout = a
            .body_idle_timeout
            .or(file.body_idle_timeout)
            .unwrap_or(p.body_idle_timeout);
        p.keepalive_timeout = a
            .keepalive_timeout
            .or(file.keepalive_timeout)
            .unwrap_or(p.keepalive_timeout);
        p.max_header_bytes = a
            .max_header_bytes
            .or(file.max_header_bytes)
            .unwrap_or(p.max_header_bytes);
        p.max_http_connections = a
            .max_http_connections
            .or(file.max_http_connections)
            .unwrap_or(p.max_http_connections);
        p.retries = a.retries.or(file.retries).unwrap_or(p.retries);
        p.cooldown = a.cooldown.or(file.cooldown).unwrap_or(p.cooldown);
        p.tcp_idle_timeout = a
            .tcp_idle_timeout
            .or(file.tcp_idle_timeout)
            .unwrap_or(p.tcp_idle_timeout);
        p.max_connections = a
            .max_connections
            .or(file.max_connections)
            .unwrap_or(p.max_connections);
        p.shutdown_grace = a
            .shutdown_grace
            .or(file.shutdown_grace)
            .unwrap_or(p.shutdown_grace);
        p.splice = !a.no_splice && file.splice.unwrap_or(true);
        p.direct_http1 = !a.no_direct_http1 && file.direct_http1.unwrap_or(true);
        p.cpu_affinity = !a.no_cpu_affinity && file.cpu_affinity.unwrap_or(true);
        if !a.echo.is_empty() {
            p.echo = a.echo;
        } else if let Some(echo) = file.echo {
            p.echo = echo;
        }
        if let Some(admin) = args.caddy_admin.or(file.caddy_admin) {
            c.caddy_admin = admin;
        }
        c.caddy_listen = args
            .caddy_listen
            .or(file.caddy_listen)
            .unwrap_or(c.caddy_listen);
        if let Some(dir) = args.envoy_dir.or(file.envoy_dir) {
            c.envoy_dir = dir;
        }
        if let Some(admin) = args.envoy_admin.or(file.envoy_admin) {
            c.envoy_admin = admin;
        }
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
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

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("in the config file {}", path.display()))
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
