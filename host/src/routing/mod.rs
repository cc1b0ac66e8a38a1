//! The routing table: one load balancer per service, reconciled from the registry whenever it
//! changes. Consumers (the embedded proxy) read an immutable snapshot and never take the
//! registry's lock per connection.

mod hosts;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use hosts::{HostIndex, host_covers, normalized, prefix_matches, strip_port};

use crate::events::{Event, Follower, Since};
use crate::model::{HostName, Kind, Match, Protocol, RouteOptions, ServiceName, ServiceView, Tls};
use crate::plugins::{BackendSpec, Balancer, Slot, Strategies};
use crate::registry::Registry;

/// One upstream's live state, as dashboards show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamState {
    pub address: String,
    pub healthy: bool,
    pub in_flight: u32,
}

/// A routable service: how it is matched, its balancer and its proxy options.
pub struct ServiceRoute {
    pub name: ServiceName,
    pub matcher: Match,
    pub options: RouteOptions,
    /// How it is served over TLS, where a TLS listener is configured.
    pub tls: Tls,
    pub balancer: Arc<Balancer>,
}

impl ServiceRoute {
    /// See [`crate::model::Route::terminates_tls`].
    pub fn terminates_tls(&self) -> bool {
        let protocol = match &self.matcher {
            Match::Http { .. } => Protocol::Http,
            Match::Tcp {
                passthrough: false, ..
            } => Protocol::Tcp,
            Match::Tcp { .. } => Protocol::TlsPassthrough,
        };
        crate::model::terminates_tls(protocol, &self.tls)
    }

    /// The names it needs Harbor's certificates for: an HTTP service's hosts (each served as
    /// its `tls` says), a tcp service's names when it terminates TLS; none otherwise.
    pub fn certified_hosts(&self) -> &[HostName] {
        match &self.matcher {
            Match::Http { hosts, .. } => hosts,
            Match::Tcp { hosts, .. } if self.terminates_tls() => hosts,
            Match::Tcp { .. } => &[],
        }
    }
}

/// What routes where, as of one registry state; immutable once published.
#[derive(Default)]
pub struct Snapshot {
    pub services: HashMap<ServiceName, Arc<ServiceRoute>>,
    pub http: HostIndex<ServiceRoute>,
    pub tcp: BTreeMap<SocketAddr, Arc<ServiceRoute>>,
    /// Listen addresses that TLS passthrough services share, each with its services by the SNI
    /// names they are routed by.
    pub sni: BTreeMap<SocketAddr, Arc<SniTable>>,
}

/// The TLS passthrough services on one listen address.
#[derive(Default)]
pub struct SniTable {
    /// By the SNI names they are routed by, exact or wildcard.
    pub names: HostIndex<ServiceRoute>,
    /// Their names, sorted: whose route error an address that cannot be bound is.
    pub services: Vec<ServiceName>,
}

pub struct RoutingTable {
    strategies: Arc<Strategies>,
    table: ArcSwap<Snapshot>,
    /// Counts published snapshots, so that listeners and health checkers can follow changes.
    published: watch::Sender<u64>,
}

impl RoutingTable {
    pub fn new(strategies: Arc<Strategies>) -> Self {
        Self {
            strategies,
            table: ArcSwap::default(),
            published: watch::Sender::new(0),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.table.load_full()
    }

    /// Wakes on every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    pub fn balancer(&self, name: &ServiceName) -> Option<Arc<Balancer>> {
        self.table
            .load()
            .services
            .get(name)
            .map(|r| r.balancer.clone())
    }

    /// Each upstream of a service with its health and in-flight count, in the service's order.
    pub fn upstream_states(&self, name: &ServiceName) -> Vec<UpstreamState> {
        let Some(balancer) = self.balancer(name) else {
            return Vec::new();
        };
        let set = balancer.backends();
        set.backends
            .iter()
            .enumerate()
            .map(|(i, b)| UpstreamState {
                address: b.address.clone(),
                healthy: b.healthy,
                in_flight: set.loads.in_flight(i),
            })
            .collect()
    }

    /// Brings the table to `services`: balancers of services that stay are updated in place, so
    /// their sequence and load counters carry on.
    pub fn sync(&self, services: &[ServiceView]) {
        let current = self.table.load();
        let mut next = Snapshot::default();
        let mut sni: BTreeMap<SocketAddr, SniTable> = BTreeMap::new();
        for service in services {
            let backends = backends_of(service);
            let slot = self.slot_for(service.route.strategy.as_str());
            let settings = service.route.strategy_settings.shared();
            let balancer = match current.services.get(&service.name) {
                Some(existing) => {
                    let balancer = existing.balancer.clone();
                    balancer.set_backends(backends);
                    balancer.set_settings(settings);
                    if balancer.strategy_name() != slot.name {
                        balancer.set_strategy(slot);
                    }
                    balancer
                }
                None => {
                    let balancer = Balancer::new(slot, backends);
                    balancer.set_settings(settings);
                    Arc::new(balancer)
                }
            };
            let matcher = match (&service.route.listen, &service.route.path) {
                (Some(listen), _) => Match::Tcp {
                    listen: *listen,
                    hosts: service.route.hosts.clone(),
                    passthrough: service.route.protocol == Protocol::TlsPassthrough,
                },
                (None, path) => Match::Http {
                    hosts: service.route.hosts.clone(),
                    path: path.clone().unwrap_or_default(),
                },
            };
            let route = Arc::new(ServiceRoute {
                name: service.name.clone(),
                matcher,
                options: service.proxy.clone(),
                tls: service.route.tls.clone(),
                balancer,
            });
            match &route.matcher {
                Match::Http { hosts, path } => {
                    for host in hosts {
                        next.http
                            .insert(host.as_str(), path.as_str(), route.clone());
                    }
                }
                Match::Tcp {
                    listen,
                    hosts,
                    passthrough: true,
                } => {
                    let table = sni.entry(*listen).or_default();
                    for host in hosts {
                        table.names.insert(host.as_str(), "/", route.clone());
                    }
                    table.services.push(service.name.clone());
                }
                Match::Tcp { listen, .. } => {
                    next.tcp.insert(*listen, route.clone());
                }
            }
            next.services.insert(service.name.clone(), route);
        }
        next.sni = sni
            .into_iter()
            .map(|(addr, mut table)| {
                table.services.sort();
                (addr, Arc::new(table))
            })
            .collect();
        self.table.store(Arc::new(next));
        self.published.send_modify(|n| *n += 1);
    }

    /// The slot for a strategy name; a name no strategy ever had gets the default's slot.
    fn slot_for(&self, name: &str) -> Arc<Slot> {
        self.strategies
            .slot(name)
            .unwrap_or_else(|| self.strategies.default_slot())
    }
}

fn backends_of(service: &ServiceView) -> Vec<BackendSpec> {
    match service.kind {
        // An instance's metadata doubles as its labels (e.g. track=canary); a route file's
        // upstreams carry theirs.
        Kind::Ephemeral => service
            .instances
            .iter()
            .map(|i| BackendSpec {
                address: i.upstream.to_string(),
                weight: i.weight,
                healthy: true,
                labels: i.meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            })
            .collect(),
        Kind::Static => service
            .upstreams
            .iter()
            .map(|u| BackendSpec {
                address: u.addr.to_string(),
                weight: u.weight,
                healthy: true,
                labels: u
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
            .collect(),
    }
}

/// Builds the table from the registry; returns the event id it is current as of, for
/// [`follow`].
pub fn build(table: &RoutingTable, registry: &Registry) -> u64 {
    let cursor = registry.bus().last_id();
    table.sync(&registry.services());
    cursor
}

/// Keeps the table in step with the registry from event `cursor` on, until cancelled.
pub async fn follow(
    table: Arc<RoutingTable>,
    registry: Arc<Registry>,
    cursor: u64,
    cancel: CancellationToken,
) {
    on_routing_changes(&registry, cursor, &cancel, |services| table.sync(services)).await;
}

/// Calls `apply` with the registry's services after every batch of events from `cursor` on that
/// changes what routes where, until cancelled. Renewals, route-file errors and plugin events
/// cause no call; a gap in the event ring (a follower too far behind) causes one.
pub async fn on_routing_changes(
    registry: &Registry,
    cursor: u64,
    cancel: &CancellationToken,
    apply: impl FnMut(&[ServiceView]),
) {
    on_changes(registry, cursor, cancel, Event::changes_routing, apply).await;
}

/// The least time between two calls of a follower's `apply`. Each call reads every service and
/// rebuilds from all of them, so a steady trickle of changes (a registration every few
/// milliseconds, each its own batch) cost a call per change, which with a large registry under
/// churn kept cores busy (see host/benches/README.md, Backends: registration to routable). Changes
/// that arrive within the gap wait for its end and are applied together; a change after a quiet
/// spell is applied at once.
const REBUILD_GAP: Duration = Duration::from_millis(20);

/// Like [`on_routing_changes`], for the events `relevant` picks.
pub async fn on_changes(
    registry: &Registry,
    cursor: u64,
    cancel: &CancellationToken,
    relevant: impl Fn(&Event) -> bool,
    mut apply: impl FnMut(&[ServiceView]),
) {
    let mut follower = Follower::new(registry.bus().clone(), cursor);
    let mut applied: Option<tokio::time::Instant> = None;
    loop {
        if let Some(at) = applied {
            tokio::select! {
                () = tokio::time::sleep_until(at + REBUILD_GAP) => {}
                () = cancel.cancelled() => return,
            }
        }
        let relevant = match follower.read() {
            Since::Events(events) => events.iter().any(|e| relevant(&e.event)),
            Since::Gap => true,
        };
        if relevant {
            apply(&registry.services());
            applied = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            changed = follower.changed() => if !changed { return },
            () = cancel.cancelled() => return,
        }
    }
}
