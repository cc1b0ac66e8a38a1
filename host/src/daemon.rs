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

use crate::api::public::{self, PublicView};
use crate::api::{self, App, Tokens};
use crate::config::{BackendKind, Config, ListenAddr};
use crate::descriptors::{Admitting, Descriptors};
use crate::dirwatch::{DirWatch, WatchOptions};
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::plugins::{self, DirState, PluginEngine, Reporter, Strategies};
use crate::proxy::{self, Proxy, ProxyMetrics};
use crate::registry::{self, Registry};
use crate::routes;
use crate::routing::{self, RoutingTable};
use crate::store::{self, Store};
use crate::{dispatch, dns};

/// A running daemon.
pub struct Harbor {
    registry: Arc<Registry>,
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
    let metrics = Arc::new(Metrics::new().context("cannot set up metrics")?);
    let proxy_metrics =
        Arc::new(ProxyMetrics::new(&metrics).context("cannot set up the proxy's metrics")?);
    let descriptors = Arc::new(Descriptors::for_this_process());
    descriptors
        .register(&metrics)
        .context("cannot set up the descriptors' metrics")?;
    let bus = Arc::new(EventBus::new(config.event_ring));
    let registry = Arc::new(Registry::new(bus, metrics.clone(), config.lease));
    let cancel = CancellationToken::new();

    let plugin_dir_state = Arc::new(std::sync::Mutex::new(DirState::default()));
    let store = Arc::new(Store::open(&config.state_dir)?);

    let engine = PluginEngine::shared()?;
    let reporter = Arc::new(Reporter::new(registry.bus().clone(), metrics.clone()));
    let cache = Some(config.state_dir.join("plugin-cache"));
    let strategies =
        tokio::task::spawn_blocking(move || Strategies::new(engine, cache, reporter)).await??;
    let known = strategies.clone();
    registry.set_strategy_check(Box::new(move |name| known.knows(name)));
    // Custom strategies load before the routes, so that route files may name them.
    let plugin_watch = match &config.plugins_dir {
        Some(dir) => {
            let watch = DirWatch::new(
                dir.clone(),
                WatchOptions {
                    notify: config.watch,
                    rescan_every: config.rescan_interval,
                },
            );
            plugins::rescan_dir(&strategies, dir, &plugin_dir_state).await;
            Some(watch)
        }
        None => None,
    };
    let restored = store::restore(&store, &registry);

    let follower = DirWatch::new(
        config.routes_dir.clone(),
        WatchOptions {
            notify: config.watch,
            rescan_every: config.rescan_interval,
        },
    );
    // The first read of the routes happens before the API answers, so a client never sees a
    // half-loaded registry.
    let dir = config.routes_dir.clone();
    let files = tokio::task::spawn_blocking(move || routes::scan(&dir))
        .await?
        .with_context(|| {
            format!(
                "cannot read the routes directory {}",
                config.routes_dir.display()
            )
        })?;
    if !config.routes_dir.exists() {
        tracing::warn!(dir = %config.routes_dir.display(), "the routes directory does not exist; no static services until it does");
    }
    registry.apply_routes(files);

    let routing = Arc::new(RoutingTable::new(strategies.clone()));
    let routed_as_of = routing::build(&routing, &registry);
    let mut tasks = JoinSet::new();
    for listener in crate::echo::bind(&config.proxy.echo).await? {
        tasks.spawn(crate::echo::serve(listener, cancel.clone()));
    }
    let proxy = Proxy::start(
        routing.clone(),
        config.proxy.clone(),
        proxy_metrics,
        registry.bus().clone(),
        proxy::Options {
            // Caddy and Envoy carry HTTP themselves; only Envoy also carries tcp routes.
            http: (config.backend == BackendKind::Embedded).then_some(config.proxy_listen),
            tcp: config.backend != BackendKind::Envoy,
            descriptors: descriptors.clone(),
        },
        &mut tasks,
    )
    .await?;
    let proxy_port = proxy.http_addr().map(|a| a.port());
    let public = Arc::new(PublicView::new(
        config.event_ring,
        config.backend,
        proxy_port,
    ));
    let public_as_of = public::build(&public, &registry, &routing);

    // Caddy follows instance churn through DNS (dynamic upstreams) instead of reloads.
    let zone = match config.backend {
        BackendKind::Caddy => {
            let (socket, addr) = dns::bind()
                .await
                .context("cannot bind the upstream DNS responder")?;
            let zone = Arc::new(dns::Zone::default());
            let cursor = registry.bus().last_id();
            zone.sync(&registry.services(), &routing);
            Some((zone, socket, addr, cursor))
        }
        _ => None,
    };
    // The proxy may be down: the dispatcher starts anyway and converges once it is up.
    let dispatcher = match config.backend {
        BackendKind::Embedded => None,
        _ => Some(dispatch::Dispatcher::new(
            &config,
            PluginEngine::shared()?,
            registry.bus().clone(),
            metrics.clone(),
            zone.as_ref().map(|(_, _, addr, _)| *addr),
        )?),
    };

    let tokens = config.token_file.as_deref().map(Tokens::load).transpose()?;
    let shared = Arc::new(App {
        registry: registry.clone(),
        metrics,
        tokens,
        cancel: cancel.clone(),
        sse_keep_alive: config.sse_keep_alive,
        strategies: strategies.clone(),
        routing: routing.clone(),
        backend: config.backend,
        dispatcher: dispatcher.as_ref().map(|(d, _)| d.clone()),
        started_at: std::time::SystemTime::now(),
        public: public.clone(),
    });
    let app = api::router(shared.clone(), config.max_body);

    let mut api_addrs = Vec::new();
    let mut unix_sockets = Vec::new();
    // A client's API connections come through a door of their own, as Gangway's do: a flood
    // on the proxy's port leaves them room, and a flood here leaves the proxy room.
    let api_door = descriptors.door("api", 1, usize::MAX);
    for listen in &config.api {
        let app = app.clone();
        let stop = cancel.clone();
        match listen {
            ListenAddr::Tcp(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for the API on {addr}"))?;
                let bound = listener.local_addr()?;
                // Event-stream frames are small writes; without NODELAY they wait on Nagle and the
                // client's delayed ACK (tens of milliseconds on loopback).
                let listener = listener.tap_io(|tcp| {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                });
                tracing::info!(addr = %bound, "API listening");
                api_addrs.push(bound);
                tasks.spawn(serve(Admitting::new(listener, api_door.clone()), app, stop));
            }
            ListenAddr::Unix(path) => {
                let listener = bind_unix(path)?;
                tracing::info!(addr = %listen, "API listening");
                unix_sockets.push(path.clone());
                tasks.spawn(serve(Admitting::new(listener, api_door.clone()), app, stop));
            }
        }
    }

    let gangway_addr = match config.gangway_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for Gangway on {addr}"))?;
            let bound = listener.local_addr()?;
            tracing::info!(addr = %bound, "Gangway listening");
            let app = api::gangway::router(shared.clone());
            let door = descriptors.door("gangway", 1, usize::MAX);
            let listener = Admitting::new(listener.tap_io(nodelay), door);
            tasks.spawn(serve(listener, app, cancel.clone()));
            Some(bound)
        }
        None => None,
    };
    tasks.spawn(public::follow(
        public,
        registry.clone(),
        routing.clone(),
        strategies.clone(),
        public_as_of,
        cancel.clone(),
    ));
    tasks.spawn(registry::reaper(registry.clone(), cancel.clone()));
    if let Some((zone, socket, addr, cursor)) = zone {
        tracing::info!(%addr, "upstream DNS responder for Caddy listening");
        tasks.spawn(dns::serve_udp(zone.clone(), socket, cancel.clone()));
        tasks.spawn(dns::follow(
            zone,
            registry.clone(),
            routing.clone(),
            cursor,
            cancel.clone(),
        ));
    }
    if let Some((dispatcher, pending)) = dispatcher {
        tasks.spawn(dispatch::run(
            dispatcher,
            pending,
            registry.clone(),
            cancel.clone(),
        ));
    }
    tasks.spawn(routing::follow(
        routing.clone(),
        registry.clone(),
        routed_as_of,
        cancel.clone(),
    ));
    let adapter_files = dispatch::AdapterFiles::default();
    if let (Some(d), Some(dir)) = (&shared.dispatcher, &config.plugins_dir) {
        // After the dispatcher task has started: the swap waits for it.
        let (d, dir, files) = (d.clone(), dir.clone(), adapter_files.clone());
        tasks.spawn(async move { dispatch::rescan_adapters(&d, &dir, &files).await });
    }
    if let Some(watch) = plugin_watch {
        let (strategies, state) = (strategies.clone(), plugin_dir_state.clone());
        let dir = watch.dir().to_owned();
        let dispatcher = shared.dispatcher.clone();
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
    tasks.spawn(store::persist(
        registry.clone(),
        store,
        config.state_flush,
        cancel.clone(),
    ));
    let rescan = Arc::new(Notify::new());
    tasks.spawn(routes::follow(
        follower,
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
        strategies = strategies.names().len(),
        route_errors = counts.route_errors,
        restored_instances = restored,
        backend = %config.backend,
        "harbor started"
    );

    Ok(Harbor {
        registry,
        proxy,
        shutdown_grace: config.proxy.shutdown_grace,
        strategies,
        routing,
        api_addrs,
        gangway_addr,
        unix_sockets,
        rescan,
        cancel,
        tasks,
    })
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

/// As on the API listeners: event-stream frames must not wait on Nagle.
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
        tracing::info!(connections_cut = cut, "harbor stopped");
        cut
    }
}
