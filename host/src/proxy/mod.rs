//! The embedded proxy: an HTTP reverse proxy ([`http`], with a direct path for plain HTTP/1.1
//! requests in [`h1`]) in embedded mode, and the L4 TCP proxy ([`tcp`]) for `tcp` routes
//! whenever the proxy Harbor drives does not carry them itself (a stock Caddy has no L4 proxy;
//! Envoy has), which a swap may change ([`carriage`]). Both HTTP paths hold one policy
//! ([`policy`]): heads and framing are read strictly and written anew ([`wire`], [`chunked`]),
//! and hyper reads clients only through [`gate`]. Both
//! read the routing snapshot, never the registry; upstreams are chosen by the route's strategy
//! ([`choose`]), kept honest by health checks and cooldowns ([`health`]), and counted
//! ([`metrics`]).

mod body;
mod carriage;
mod choose;
mod chunked;
mod client_io;
mod conns;
mod copy;
mod deadline;
mod dial;
mod gate;
mod guard;
mod h1;
mod headers;
mod health;
mod http;
mod lanes;
pub mod metrics;
mod policy;
mod pool;
mod secure;
mod sni;
mod splice;
mod spread;
mod tcp;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::ProxySettings;
use crate::descriptors::{Descriptors, Door};
use crate::events::EventBus;
use crate::routing::RoutingTable;

pub use carriage::TcpCarriage;
pub use conns::Connections;
pub use guard::Guarded;
pub use metrics::ProxyMetrics;
pub use secure::TlsFront;
pub use tcp::can_listen;

/// What every proxy task shares.
pub struct Shared {
    pub routing: Arc<RoutingTable>,
    pub settings: ProxySettings,
    pub metrics: Arc<ProxyMetrics>,
    pub bus: Arc<EventBus>,
    pub conns: Arc<Connections>,
    pool: Arc<pool::Pool>,
    streams: pool::Streams,
    /// Client HTTP connections come in through this door.
    http_door: Arc<Door>,
    /// Connections to every tcp route come in through this door.
    tcp_door: Arc<Door>,
    /// How many lanes serve connections.
    lanes: usize,
    /// Told when a tcp route's address cannot be bound, and when it can again.
    listen_report: ListenReport,
    /// The TLS listener's certificates and port, when there is one.
    tls: Option<TlsFront>,
}

/// Told, for a tcp route, why its address cannot be bound (`None`: it is bound now).
pub type ListenReport = Arc<dyn Fn(&crate::model::ServiceName, Option<String>) + Send + Sync>;

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    http_addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    tcp: TcpCarriage,
    /// Stops the listeners (and the tasks that follow the routing table).
    stop_accepting: CancellationToken,
}

pub struct Options {
    /// Where the HTTP proxy listens; `None` when another proxy carries HTTP.
    pub http: Option<SocketAddr>,
    /// Whether Harbor carries `tcp` routes, now and after a swap.
    pub tcp: TcpCarriage,
    pub listen_report: ListenReport,
    pub descriptors: Arc<Descriptors>,
    /// Where HTTPS is served, and with which certificates.
    pub tls: Option<(SocketAddr, Arc<crate::tls::Certificates>)>,
    /// Harbor's certificates where it serves no HTTPS itself (Caddy mode), for the tcp
    /// services whose TLS it terminates.
    pub tcp_certificates: Option<Arc<crate::tls::Certificates>>,
}

impl Proxy {
    pub async fn start(
        routing: Arc<RoutingTable>,
        settings: ProxySettings,
        metrics: Arc<ProxyMetrics>,
        bus: Arc<EventBus>,
        options: Options,
        tasks: &mut JoinSet<()>,
    ) -> anyhow::Result<Self> {
        let lanes = std::thread::available_parallelism().map_or(1, |n| n.get());
        let descriptors = &options.descriptors;
        // The pools share their room: hyper's pool and the direct path's half each.
        let pooled = descriptors.pooled() / 2;
        // A proxied connection holds the client's socket and an upstream's.
        let http_door = descriptors.door("http", 2, settings.max_http_connections);
        let tls_listener = match &options.tls {
            Some((addr, certificates)) => {
                let listener = TcpListener::bind(addr).await.map_err(|e| {
                    anyhow::anyhow!("cannot listen for the HTTPS proxy on {addr}: {e}")
                })?;
                let bound = listener.local_addr()?;
                let config = secure::server_config(certificates.clone())?;
                Some((listener, bound, certificates.clone(), config))
            }
            None => None,
        };
        let tcp_door = descriptors.door("tcp", 2, settings.max_connections);
        let shared = Arc::new(Shared {
            routing,
            settings,
            metrics,
            bus,
            conns: Arc::default(),
            pool: Arc::new(pool::Pool::new(pooled)),
            streams: pool::Streams::new(lanes, pooled),
            http_door,
            tcp_door,
            lanes,
            listen_report: options.listen_report.clone(),
            tls: match (&tls_listener, options.tcp_certificates) {
                (Some((_, bound, certificates, _)), _) => Some(TlsFront {
                    certificates: certificates.clone(),
                    port: Some(bound.port()),
                }),
                (None, Some(certificates)) => Some(TlsFront {
                    certificates,
                    port: None,
                }),
                (None, None) => None,
            },
        });
        let stop = CancellationToken::new();
        // Each accept loop holds the lanes and drops them when it stops, so the lane threads end
        // once accepting has stopped everywhere and their connections have ended.
        let lanes = start_lanes(&shared);
        let mut http_addr = None;
        if let Some(addr) = options.http {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen for the HTTP proxy on {addr}: {e}"))?;
            let bound = listener.local_addr()?;
            tracing::info!(addr = %bound, "HTTP proxy listening");
            http_addr = Some(bound);
            tasks.spawn(http::serve(
                shared.clone(),
                listener,
                lanes.clone(),
                stop.clone(),
            ));
        }
        let mut tls_addr = None;
        if let Some((listener, bound, _, config)) = tls_listener {
            tracing::info!(addr = %bound, "HTTPS proxy listening");
            tls_addr = Some(bound);
            tasks.spawn(secure::serve(
                shared.clone(),
                listener,
                lanes.clone(),
                tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                stop.clone(),
            ));
        }
        tasks.spawn(tcp::supervise(
            shared.clone(),
            lanes,
            options.tcp.clone(),
            stop.clone(),
        ));
        tasks.spawn(health::supervise(shared.clone(), stop.clone()));
        tasks.spawn(follow(shared.clone(), stop.clone()));
        Ok(Self {
            shared,
            http_addr,
            tls_addr,
            tcp: options.tcp,
            stop_accepting: stop,
        })
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The switch of who carries the tcp routes.
    pub fn tcp_carriage(&self) -> &TcpCarriage {
        &self.tcp
    }

    /// Connections open now (HTTP connections, TCP connections, upgraded tunnels).
    pub fn open_connections(&self) -> usize {
        self.shared.conns.count()
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then cuts the rest.
    /// Returns how many were cut.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.stop_accepting.cancel();
        let open = self.shared.conns.count();
        if open > 0 {
            tracing::info!(open, grace = %humantime::format_duration(grace), "draining connections");
        }
        let cut = self.shared.conns.drain(grace).await;
        if cut > 0 {
            self.shared.metrics.cut_at_shutdown.inc_by(cut as u64);
            tracing::warn!(cut, "grace period over: connections cut");
        } else if open > 0 {
            tracing::info!("all connections finished");
        }
        cut
    }
}

/// One lane per core this machine has; on failure connections are served on the main runtime.
fn start_lanes(shared: &Shared) -> Option<Arc<lanes::Lanes>> {
    let affinity = if shared.settings.cpu_affinity {
        lanes::Affinity::Cores
    } else {
        lanes::Affinity::Free
    };
    lanes::Lanes::start(shared.lanes, affinity)
        .inspect_err(|e| {
            tracing::warn!(error = %e, "cannot start the proxy lanes; serving on the main runtime");
        })
        .ok()
}

/// Keeps the metric handles and the connection pool in step with the routing table.
async fn follow(shared: Arc<Shared>, stop: CancellationToken) {
    let mut changes = shared.routing.subscribe();
    loop {
        changes.borrow_and_update();
        let snapshot = shared.routing.snapshot();
        shared.metrics.refresh(&snapshot);
        let live: std::collections::HashSet<String> = snapshot
            .services
            .values()
            .flat_map(|r| {
                r.balancer
                    .backends()
                    .backends
                    .iter()
                    .map(|b| b.address.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        shared.pool.retain(|address| live.contains(address));
        shared.streams.retain(|address| live.contains(address));
        // This is housekeeping over every upstream, and nothing waits for it (a new upstream's
        // metrics are resolved on first use): under churn, one pass per snapshot was most of
        // the daemon's CPU.
        tokio::select! {
            () = tokio::time::sleep(HOUSEKEEPING_GAP) => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
    }
}

/// The least time between two passes of [`follow`].
const HOUSEKEEPING_GAP: Duration = Duration::from_millis(100);

/// Waits before the next accept after `failures` failures in a row (out of file descriptors,
/// usually): 10 ms doubling to 1 s, so a full descriptor table is not spun on.
async fn accept_backoff(failures: u32, stop: &CancellationToken) {
    const ACCEPT: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    let delay = ACCEPT.after(failures);
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = stop.cancelled() => {}
    }
}
