//! Starting and stopping a whole daemon in-process: build the registry, restore saved state,
//! load the routes, bind the listeners, and run the background tasks until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::{self, App, Tokens};
use crate::config::{BackendKind, Config, ListenAddr};
use crate::descriptors::{Admitting, Descriptors};
use crate::dirwatch::{DirWatch, WatchOptions};
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::plugins::{self, DirState, PluginEngine, Reporter, Strategies};
use crate::proxy::{self, Guarded, Proxy, ProxyMetrics, TcpCarriage};
use crate::public::{self, PublicView};
use crate::registry::{self, Registry};
use crate::routes;
use crate::routing::{self, RoutingTable};
use crate::store::{self, JournalWriter};
use crate::tls::Certificates;
use crate::tls::acme::{Acme, AcmeSettings};
use crate::{dispatch, dns};

/// A running daemon.
pub struct Harbor {
    registry: Arc<Registry>,
    /// Where registrations are made durable; closed last at shutdown.
    journal: Arc<JournalWriter>,
    proxy: Proxy,
    shutdown_grace: std::time::Duration,
    strategies: Arc<Strategies>,
    routing: Arc<RoutingTable>,
    api_addrs: Vec<SocketAddr>,
    gangway_addr: Option<SocketAddr>,
    unix_sockets: Vec<PathBuf>,
    rescan: Arc<Notify>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

/// Starts a daemon; it runs until [`Harbor::shutdown`].
pub async fn start(config: Config) -> anyhow::Result<Harbor> {
    config.validate()?;
    let core = Core::new(&config)?;
    let plugins = load_strategies(&config, &core).await?;
    let routes = read_routes(&config, &core.registry).await?;

    let routing = Arc::new(RoutingTable::new(plugins.strategies.clone()));
    let routed_as_of = routing::build(&routing, &core.registry);
    let mut tasks = JoinSet::new();
    for listener in crate::echo::bind(&config.proxy.echo).await? {
        tasks.spawn(crate::echo::serve(listener, core.cancel.clone()));
    }
    let certificates = start_certificates(&config, &routing).await?;
    let proxy = start_proxy(&config, &core, &routing, certificates.as_ref(), &mut tasks).await?;
    if let Some(acme) = certificates.as_ref().and_then(|c| c.acme()) {
        tasks.spawn(
            acme.clone()
                .run(routing.clone(), core.metrics.clone(), core.cancel.clone()),
        );
    }
    if let Some(certificates) = &certificates {
        tasks.spawn(crate::tls::follow(
            certificates.clone(),
            routing.clone(),
            core.registry.bus().clone(),
            CERTIFICATE_CHECKS,
            core.cancel.clone(),
        ));
    }
    let proxy_port = proxy.http_addr().map(|a| a.port());
    let public = Arc::new(PublicView::new(
        config.event_ring,
        config.backend,
        proxy_port,
    ));
    let public_as_of = public::build(&public, &core.registry, &routing);
    // Cancelled once the backend driver has written what the proxy needs while Harbor is away.
    let settled = CancellationToken::new();
    let zone = bind_dns(&config, &core.registry, &routing).await?;
    let dns_addr = zone.as_ref().map(|z| z.bound.addr);
    // Served as soon as it is bound: Caddy finds the responder at the address it had before a
    // restart, and a query left unanswered while the rest starts (the adapter compiling, say)
    // would hold its requests until its resolver gives up.
    let zone = zone.map(|zone| {
        tracing::info!(addr = %zone.bound.addr, "upstream DNS responder for Caddy listening");
        tasks.spawn(dns::serve(
            zone.zone.clone(),
            zone.bound,
            core.cancel.clone(),
            settled.clone(),
        ));
        (zone.zone, zone.as_of)
    });
    // The proxy may be down: the dispatcher starts anyway and converges once it is up.
    let dispatcher = match config.backend {
        BackendKind::Embedded => None,
        _ => Some(dispatch::Dispatcher::new(
            &config,
            PluginEngine::shared()?,
            core.registry.bus().clone(),
            core.metrics.clone(),
            dns_addr,
            proxy.tcp_carriage().clone(),
            certificates.clone(),
        )?),
    };

    let tokens = config.token_file.as_deref().map(Tokens::load).transpose()?;
    let app = Arc::new(App {
        registry: core.registry.clone(),
        metrics: core.metrics.clone(),
        tokens,
        cancel: core.cancel.clone(),
        // A stream's comments are what keeps its connection from counting as idle.
        sse_keep_alive: config
            .sse_keep_alive
            .min(config.proxy.keepalive_timeout / 2),
        strategies: plugins.strategies.clone(),
        routing: routing.clone(),
        backend: config.backend,
        dispatcher: dispatcher.as_ref().map(|(d, _)| d.clone()),
        started_at: std::time::SystemTime::now(),
        public: public.clone(),
        protect_reads: config.protect_reads,
        tcp: proxy.tcp_carriage().clone(),
        certificates: certificates.clone(),
    });
    let listeners = bind_api(&config, &core, &app, &mut tasks).await?;
    if let Some((dispatcher, _)) = &dispatcher {
        dispatcher.set_acme_answerer(&listeners.api);
    }

    // Everything that follows the registry, each from the event it was built as of.
    let cancel = &core.cancel;
    let registry = &core.registry;
    tasks.spawn(public::follow(
        public,
        registry.clone(),
        routing.clone(),
        plugins.strategies.clone(),
        public_as_of,
        cancel.clone(),
    ));
    tasks.spawn(registry::reaper(registry.clone(), cancel.clone()));
    if let Some((zone, as_of)) = zone {
        tasks.spawn(dns::follow(
            zone,
            registry.clone(),
            routing.clone(),
            as_of,
            cancel.clone(),
        ));
    }
    if let Some((dispatcher, pending)) = dispatcher {
        tasks.spawn(dispatch::run(
            dispatcher,
            pending,
            registry.clone(),
            cancel.clone(),
            settled.clone(),
        ));
    }
    tasks.spawn(routing::follow(
        routing.clone(),
        registry.clone(),
        routed_as_of,
        cancel.clone(),
    ));
    follow_plugins(&config, &app, plugins.watch, &mut tasks, cancel);
    let rescan = Arc::new(Notify::new());
    tasks.spawn(routes::follow_strategies(
        registry.clone(),
        rescan.clone(),
        registry.bus().last_id(),
        cancel.clone(),
    ));
    tasks.spawn(routes::follow(
        routes,
        registry.clone(),
        rescan.clone(),
        cancel.clone(),
    ));

    let counts = registry.counts();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        api = %config.api.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        routes = %config.routes_dir.display(),
        static_services = counts.static_services,
        strategies = plugins.strategies.names().len(),
        route_errors = counts.route_errors,
        restored_instances = core.restored,
        backend = %config.backend,
        "harbor started"
    );

    Ok(Harbor {
        registry: core.registry,
        journal: core.journal,
        proxy,
        shutdown_grace: config.proxy.shutdown_grace,
        strategies: plugins.strategies,
        routing,
        api_addrs: listeners.api,
        gangway_addr: listeners.gangway,
        unix_sockets: listeners.unix_sockets,
        rescan,
        cancel: core.cancel,
        tasks,
    })
}

/// What every part of a daemon is built on.
struct Core {
    metrics: Arc<Metrics>,
    proxy_metrics: Arc<ProxyMetrics>,
    descriptors: Arc<Descriptors>,
    registry: Arc<Registry>,
    journal: Arc<JournalWriter>,
    /// Instances the state directory gave back.
    restored: usize,
    cancel: CancellationToken,
}

impl Core {
    fn new(config: &Config) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new().context("cannot set up metrics")?);
        let proxy_metrics =
            Arc::new(ProxyMetrics::new(&metrics).context("cannot set up the proxy's metrics")?);
        let descriptors = Arc::new(Descriptors::for_this_process());
        descriptors
            .register(&metrics)
            .context("cannot set up the descriptors' metrics")?;
        let bus = Arc::new(EventBus::new(config.event_ring));
        let registry = Arc::new(Registry::new(bus, metrics.clone(), config.lease));
        // First, before anything else writes into the state directory: it is this daemon's.
        let (journal, restored) = store::open(&config.state_dir, &registry, &metrics)?;
        Ok(Self {
            metrics,
            proxy_metrics,
            descriptors,
            registry,
            journal,
            restored,
            cancel: CancellationToken::new(),
        })
    }
}

/// The strategies, built-in and custom, and the watch on the plugins directory.
struct Plugins {
    strategies: Arc<Strategies>,
    watch: Option<(DirWatch, Arc<std::sync::Mutex<DirState>>)>,
}

/// Loads the strategies. Custom ones load before the routes, so that route files may name them.
async fn load_strategies(config: &Config, core: &Core) -> anyhow::Result<Plugins> {
    let engine = PluginEngine::shared()?;
    let reporter = Arc::new(Reporter::new(
        core.registry.bus().clone(),
        core.metrics.clone(),
    ));
    let cache = Some(config.state_dir.join("plugin-cache"));
    let strategies =
        tokio::task::spawn_blocking(move || Strategies::new(engine, cache, reporter)).await??;
    let known = strategies.clone();
    core.registry
        .set_strategy_check(Box::new(move |name| known.knows(name)));
    let checking = strategies.clone();
    core.registry
        .set_settings_check(Arc::new(move |name, settings| {
            // An unknown strategy is the registry's to report, with the file's other errors.
            if !checking.knows(name) {
                return Ok(());
            }
            checking.check_settings(name, settings)
        }));
    let watch = match &config.plugins_dir {
        Some(dir) => {
            let state = Arc::new(std::sync::Mutex::new(DirState::default()));
            plugins::rescan_dir(&strategies, dir, &state).await;
            Some((DirWatch::new(dir.clone(), watch_options(config)), state))
        }
        None => None,
    };
    Ok(Plugins { strategies, watch })
}

fn watch_options(config: &Config) -> WatchOptions {
    WatchOptions {
        notify: config.watch,
        rescan_every: config.rescan_interval,
    }
}

/// Reads the routes directory into the registry, and returns the watch that follows it. The
/// first read happens before the API answers, so a client never sees a half-loaded registry.
async fn read_routes(config: &Config, registry: &Registry) -> anyhow::Result<DirWatch> {
    let watch = DirWatch::new(config.routes_dir.clone(), watch_options(config));
    let dir = config.routes_dir.clone();
    let check = registry.settings_check();
    let files = tokio::task::spawn_blocking(move || routes::scan_checked(&dir, check.as_ref()))
        .await?
        .with_context(|| {
            format!(
                "cannot read the routes directory {}",
                config.routes_dir.display()
            )
        })?;
    match files {
        Some(files) => registry.apply_routes(files),
        None => {
            tracing::warn!(dir = %config.routes_dir.display(), "the routes directory does not exist; no static services until it does");
            registry.routes_dir_missing(&config.routes_dir.display().to_string());
        }
    }
    Ok(watch)
}

/// How often certificate files are looked at for changes, and local certificates for their
/// age, besides at every routing change.
const CERTIFICATE_CHECKS: std::time::Duration = std::time::Duration::from_secs(1);

/// The certificate store, where a TLS listener is configured, with the routes as they stand
/// given their certificates before the listener takes its first connection.
async fn start_certificates(
    config: &Config,
    routing: &Arc<RoutingTable>,
) -> anyhow::Result<Option<Arc<Certificates>>> {
    // Caddy obtains its own, but issues `internal` ones from Harbor's CA, and a swap to Envoy
    // needs Harbor's.
    let wanted = match config.backend {
        BackendKind::Embedded | BackendKind::Envoy => config.tls_listen.is_some(),
        BackendKind::Caddy => config.tls_listen.is_some() || config.caddy_tls_listen.is_some(),
    };
    if !wanted {
        return Ok(None);
    }
    let dir = config.state_dir.join("tls");
    let acme = Arc::new(Acme::new(
        AcmeSettings {
            directory: config.acme_directory.clone(),
            email: config.acme_email.clone(),
            ca_root: config.acme_ca_root.clone(),
            renew_before: config.acme_renew_before,
            retry_after: config.acme_retry,
            challenge: config.acme_challenge,
        },
        dir.join("acme"),
    ));
    // Caddy orders its own: until a swap says otherwise, Harbor's client stays idle.
    acme.set_active(config.backend != BackendKind::Caddy);
    let (routing, made) = (routing.clone(), dir.clone());
    let certificates = tokio::task::spawn_blocking(move || {
        let certificates = Certificates::new(Some(&made), Some(acme));
        for problem in certificates.sync(&routing.snapshot()) {
            tracing::warn!(service = %problem.service, reason = %problem.reason, "TLS problem");
        }
        certificates
    })
    .await?;
    tracing::info!(ca = %dir.display(), "certificates ready");
    Ok(Some(Arc::new(certificates)))
}

async fn start_proxy(
    config: &Config,
    core: &Core,
    routing: &Arc<RoutingTable>,
    certificates: Option<&Arc<Certificates>>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Proxy> {
    Proxy::start(
        routing.clone(),
        config.proxy.clone(),
        core.proxy_metrics.clone(),
        core.registry.bus().clone(),
        proxy::Options {
            // Caddy and Envoy carry HTTP themselves; only Envoy also carries tcp routes, until
            // a swap says otherwise.
            http: (config.backend == BackendKind::Embedded).then_some(config.proxy_listen),
            tcp: TcpCarriage::new(config.backend != BackendKind::Envoy),
            listen_report: {
                let registry = core.registry.clone();
                Arc::new(move |name, reason| registry.listen_failed(name, reason))
            },
            descriptors: core.descriptors.clone(),
            tls: match (config.backend, config.tls_listen, certificates) {
                (BackendKind::Embedded, Some(addr), Some(certificates)) => {
                    Some((addr, certificates.clone()))
                }
                _ => None,
            },
            tcp_certificates: certificates
                .filter(|_| config.backend != BackendKind::Embedded)
                .cloned(),
        },
        tasks,
    )
    .await
}

/// The DNS zone Caddy's dynamic upstreams read, bound and filled.
struct DnsZone {
    zone: Arc<dns::Zone>,
    bound: dns::Bound,
    /// The event the zone was filled as of.
    as_of: u64,
}

/// Caddy follows instance churn through DNS (dynamic upstreams) instead of reloads.
async fn bind_dns(
    config: &Config,
    registry: &Registry,
    routing: &RoutingTable,
) -> anyhow::Result<Option<DnsZone>> {
    if config.backend != BackendKind::Caddy {
        return Ok(None);
    }
    let bound = dns::bind(config.dns_listen, &config.state_dir)
        .await
        .context("cannot bind the upstream DNS responder")?;
    let zone = Arc::new(dns::Zone::default());
    let as_of = registry.bus().last_id();
    zone.sync(&registry.services(), routing);
    Ok(Some(DnsZone { zone, bound, as_of }))
}

/// Where the API and Gangway listen.
struct Listeners {
    api: Vec<SocketAddr>,
    unix_sockets: Vec<PathBuf>,
    gangway: Option<SocketAddr>,
}

/// Binds the API listeners and Gangway's, and serves them.
async fn bind_api(
    config: &Config,
    core: &Core,
    app: &Arc<App>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Listeners> {
    let router = api::router(app.clone(), config.max_body);
    let mut listeners = Listeners {
        api: Vec::new(),
        unix_sockets: Vec::new(),
        gangway: None,
    };
    // A client's API connections come through a door of their own, as Gangway's do: a flood
    // on the proxy's port leaves them room, and a flood here leaves the proxy room.
    let api_door = core
        .descriptors
        .control_door("api", config.api_max_connections);
    for listen in &config.api {
        let (router, stop) = (router.clone(), core.cancel.clone());
        match listen {
            ListenAddr::Tcp(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for the API on {addr}"))?;
                let bound = listener.local_addr()?;
                tracing::info!(addr = %bound, "API listening");
                listeners.api.push(bound);
                let listener = Guarded::new(
                    Admitting::new(listener.tap_io(nodelay), api_door.clone()),
                    &config.proxy,
                );
                tasks.spawn(serve(listener, router, stop));
            }
            ListenAddr::Unix(path) => {
                let listener = bind_unix(path)?;
                tracing::info!(addr = %listen, "API listening");
                listeners.unix_sockets.push(path.clone());
                let listener =
                    Guarded::new(Admitting::new(listener, api_door.clone()), &config.proxy);
                tasks.spawn(serve(listener, router, stop));
            }
        }
    }
    if let Some(addr) = config.gangway_listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for Gangway on {addr}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(addr = %bound, "Gangway listening");
        let router = api::gangway::router(app.clone());
        let door = core
            .descriptors
            .control_door("gangway", config.api_max_connections);
        let listener = Guarded::new(
            Admitting::new(listener.tap_io(nodelay), door),
            &config.proxy,
        );
        tasks.spawn(serve(listener, router, core.cancel.clone()));
        listeners.gangway = Some(bound);
    }
    Ok(listeners)
}

/// Follows the plugins directory: strategies, and with Caddy or Envoy, the backend adapters.
fn follow_plugins(
    config: &Config,
    app: &App,
    watch: Option<(DirWatch, Arc<std::sync::Mutex<DirState>>)>,
    tasks: &mut JoinSet<()>,
    cancel: &CancellationToken,
) {
    let adapter_files = dispatch::AdapterFiles::default();
    if let (Some(d), Some(dir)) = (&app.dispatcher, &config.plugins_dir) {
        // After the dispatcher task has started: the swap waits for it.
        let (d, dir, files) = (d.clone(), dir.clone(), adapter_files.clone());
        tasks.spawn(async move { dispatch::rescan_adapters(&d, &dir, &files).await });
    }
    let Some((watch, state)) = watch else {
        return;
    };
    let strategies = app.strategies.clone();
    let dir = watch.dir().to_owned();
    let dispatcher = app.dispatcher.clone();
    tasks.spawn(watch.run(Arc::new(Notify::new()), cancel.clone(), move || {
        let (strategies, state, dir) = (strategies.clone(), state.clone(), dir.clone());
        let (dispatcher, files) = (dispatcher.clone(), adapter_files.clone());
        async move {
            plugins::rescan_dir(&strategies, &dir, &state).await;
            if let Some(d) = dispatcher {
                dispatch::rescan_adapters(&d, &dir, &files).await;
            }
        }
    }));
}

async fn serve<L>(listener: L, app: axum::Router, stop: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "API listener failed");
    }
}

/// Event-stream frames are small writes; without `TCP_NODELAY` they wait on Nagle and the
/// client's delayed ACK (tens of milliseconds on loopback).
fn nodelay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}

fn bind_unix(path: &PathBuf) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // A socket file left by an earlier run would make bind fail; anything else is not ours.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            anyhow::bail!("{} exists and is not a socket", path.display());
        }
    }
    UnixListener::bind(path)
        .with_context(|| format!("cannot listen for the API on unix:{}", path.display()))
}

impl Harbor {
    /// The bound address of the first TCP API listener (useful with port 0).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addrs.first().copied()
    }

    /// Where `--gangway-listen` bound, if it was given.
    pub fn gangway_addr(&self) -> Option<SocketAddr> {
        self.gangway_addr
    }

    pub fn api_addrs(&self) -> &[SocketAddr] {
        &self.api_addrs
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn strategies(&self) -> &Arc<Strategies> {
        &self.strategies
    }

    pub fn routing(&self) -> &Arc<RoutingTable> {
        &self.routing
    }

    /// Re-reads the routes directory now (what SIGHUP does).
    pub fn rescan(&self) {
        self.rescan.notify_one();
    }

    /// Where the embedded HTTP proxy listens, when it runs.
    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.proxy.http_addr()
    }

    /// Where the embedded proxy serves HTTPS, when it does.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.proxy.tls_addr()
    }

    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// Stops accepting, lets open proxy connections drain for the grace period, ends event
    /// streams, saves the registrations and waits for every task. Returns how many proxy
    /// connections had to be cut.
    pub async fn shutdown(mut self) -> usize {
        let cut = self.proxy.drain(self.shutdown_grace).await;
        self.cancel.cancel();
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a task failed during shutdown");
            }
        }
        for path in &self.unix_sockets {
            let _ = std::fs::remove_file(path);
        }
        let journal = self.journal.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || journal.close()).await {
            tracing::error!(error = %e, "the journal could not be closed");
        }
        tracing::info!(connections_cut = cut, "harbor stopped");
        cut
    }
}
