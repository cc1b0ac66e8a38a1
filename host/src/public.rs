//! The public view that Gangway (and anyone who can reach it) reads: public services only, with
//! only the fields anyone may see, kept by one follower task in a ring of its own. Private
//! services and events about them never enter the ring, and a service that turns private or goes
//! away leaves it as a `service_removed`, so a public stream can never show something stale.
//!
//! The ring has its own ids (starting from the wall clock like the event bus, so they keep
//! increasing across restarts). Events that change the services are published under the
//! services' lock, and a snapshot is taken under it, so a subscriber's snapshot and the events
//! after it always join up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::BackendKind;
use crate::events::{Event, Feed, Follower, Publishes, Since, lock};
use crate::model::{CatalogEntry, CatalogUpstream, Kind, RouteView, ServiceName, ServiceView};
use crate::plugins::Strategies;
use crate::registry::Registry;
use crate::routing::RoutingTable;

/// How often the in-flight load of public upstreams, and shadows' agreement, are sampled; they
/// change without events.
const LOAD_SAMPLE: Duration = Duration::from_secs(1);

/// One public event, rendered once.
#[derive(Debug)]
pub struct PublicEvent {
    pub id: u64,
    pub kind: &'static str,
    pub data: String,
}

pub struct PublicView {
    inner: Mutex<Inner>,
    /// The public events; those that change the services are published under `inner`'s lock.
    feed: Feed<PublicEvent>,
    backend: BackendKind,
    /// The port people open HTTP services on, when Harbor is the proxy.
    proxy_port: Option<u16>,
}

struct Inner {
    services: BTreeMap<ServiceName, Value>,
    /// Health reported by events, which wins over the routing table's until the next report.
    health: HashMap<(ServiceName, String), bool>,
}

/// A public service: the catalog's safe projection, plus live upstream state where known.
#[derive(Serialize)]
struct PublicService {
    name: ServiceName,
    kind: Kind,
    #[serde(flatten)]
    route: RouteView,
    upstreams: Vec<PublicUpstream>,
    /// A strategy shadowing the live one, and how often the two agree.
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow: Option<PublicShadow>,
}

#[derive(Serialize)]
struct PublicShadow {
    strategy: String,
    /// The share of picks on which the shadow chose as the live strategy did.
    #[serde(skip_serializing_if = "Option::is_none")]
    agreement: Option<f64>,
}

#[derive(Serialize)]
struct PublicUpstream {
    #[serde(flatten)]
    base: CatalogUpstream,
    /// The lease length, so a page can tell a lease near its end from a long one.
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    healthy: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_flight: Option<u32>,
}

impl PublicView {
    pub fn new(capacity: usize, backend: BackendKind, proxy_port: Option<u16>) -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Self {
            inner: Mutex::new(Inner {
                services: BTreeMap::new(),
                health: HashMap::new(),
            }),
            feed: Feed::new(start, capacity),
            backend,
            proxy_port,
        }
    }

    /// The public services and the id of the last public event they include.
    pub fn snapshot(&self) -> (u64, Vec<Value>) {
        let inner = lock(&self.inner);
        (
            self.feed.last_id(),
            inner.services.values().cloned().collect(),
        )
    }

    fn render(&self, service: &ServiceView, routing: &RoutingTable) -> Option<Value> {
        let entry = CatalogEntry::from(service);
        let live = (self.backend == BackendKind::Embedded).then(|| {
            routing
                .upstream_states(&service.name)
                .into_iter()
                .map(|s| (s.address.clone(), s))
                .collect::<HashMap<_, _>>()
        });
        let overrides = lock(&self.inner);
        let upstreams = entry
            .upstreams
            .into_iter()
            .enumerate()
            .map(|(i, base)| {
                let addr = base.addr.to_string();
                let state = live.as_ref().and_then(|m| m.get(&addr));
                let reported = overrides.health.get(&(service.name.clone(), addr));
                let healthy = reported
                    .copied()
                    .or(state.map(|s| s.healthy))
                    // An upstream the table has not picked up yet starts healthy and idle.
                    .or(live.as_ref().map(|_| true));
                let in_flight = state.map(|s| s.in_flight).or(live.as_ref().map(|_| 0));
                PublicUpstream {
                    ttl_secs: (service.kind == Kind::Ephemeral)
                        .then(|| {
                            service
                                .instances
                                .get(i)
                                .map(|inst| inst.lease.ttl.as_secs())
                        })
                        .flatten(),
                    base,
                    healthy,
                    in_flight,
                }
            })
            .collect();
        drop(overrides);
        // Sampled with the load: agreement changes with every pick, not with events.
        let shadow = routing
            .balancer(&service.name)
            .and_then(|b| b.shadow())
            .map(|s| {
                let report = s.report();
                PublicShadow {
                    strategy: report.strategy,
                    // Whole percent: finer changes would be a new event every sample.
                    agreement: report.agreement.map(|a| (a * 100.0).round() / 100.0),
                }
            });
        let public = PublicService {
            name: entry.name,
            kind: entry.kind,
            route: entry.route,
            upstreams,
            shadow,
        };
        serde_json::to_value(&public)
            .inspect_err(|e| tracing::error!(error = %e, "a public service could not be rendered"))
            .ok()
    }

    /// Brings one service's public entry to the registry's current state, publishing the
    /// difference if there is one.
    fn refresh(&self, name: &ServiceName, registry: &Registry, routing: &RoutingTable) {
        let current = registry.service(name);
        let exists = current.is_some();
        let rendered = current
            .filter(|s| s.public)
            .and_then(|s| self.render(&s, routing));
        let mut inner = lock(&self.inner);
        match rendered {
            Some(entry) => {
                if inner.services.get(name) == Some(&entry) {
                    return;
                }
                let data = json!({ "type": "service", "service": entry });
                inner.services.insert(name.clone(), entry);
                self.publish("service", &data);
            }
            None => {
                if !exists {
                    inner.health.retain(|(n, _), _| n != name);
                }
                if inner.services.remove(name).is_none() {
                    return;
                }
                let data = json!({ "type": "service_removed", "name": name });
                self.publish("service_removed", &data);
            }
        }
    }

    fn publish(&self, kind: &'static str, data: &Value) {
        self.feed.push(|id| PublicEvent {
            id,
            kind,
            data: data.to_string(),
        });
    }

    /// Takes in a batch of registry events: every service they touch is brought up to date
    /// once, however many events named it.
    fn apply<'a>(
        &self,
        events: impl Iterator<Item = &'a Event>,
        registry: &Registry,
        routing: &RoutingTable,
        strategies: &Strategies,
    ) {
        let mut touched = BTreeSet::new();
        for event in events {
            match event {
                Event::ServiceAdded { service } | Event::ServiceUpdated { service } => {
                    touched.insert(service.name.clone());
                }
                Event::ServiceRemoved { name }
                | Event::InstanceRegistered { name, .. }
                | Event::InstanceRenewed { name, .. }
                | Event::InstanceExpired { name, .. }
                | Event::InstanceDeregistered { name, .. }
                | Event::StrategyChanged { name, .. } => {
                    touched.insert(name.clone());
                }
                Event::UpstreamHealth {
                    name,
                    upstream,
                    healthy,
                } => {
                    lock(&self.inner)
                        .health
                        .insert((name.clone(), upstream.clone()), *healthy);
                    touched.insert(name.clone());
                }
                // Plugin names and states are safe to show; sources, hashes and messages may
                // carry paths or internals, so they stay on the operator stream.
                Event::PluginLoaded { name, .. } => self.plugin(name, "loaded", strategies),
                Event::PluginFault { name, .. } => self.plugin(name, "fault", strategies),
                Event::PluginDisabled { name, .. } => self.plugin(name, "disabled", strategies),
                Event::PluginRemoved { name } => self.plugin(name, "removed", strategies),
                // Whether the driven proxy is in sync, and with which adapter; reasons and
                // details may name internals, so they stay on the operator stream.
                Event::BackendApplied { adapter, .. } => self.backend(adapter, "applied", true),
                Event::BackendFailed { adapter, .. } => self.backend(adapter, "failed", false),
                Event::BackendDrift { adapter, .. } => self.backend(adapter, "drift", false),
                Event::BackendSwapped { to, .. } => self.backend(to, "swapped", false),
                // A count only: which services and why may name internals.
                Event::TlsStatus { problems } => {
                    self.publish("tls", &json!({ "type": "tls", "problems": problems }))
                }
                Event::BackendSwapFailed { .. }
                | Event::TlsProblem { .. }
                | Event::PluginCompiling { .. }
                | Event::PluginRejected { .. }
                | Event::RouteFileError { .. }
                | Event::RouteFileRecovered { .. }
                | Event::StateFileError { .. }
                | Event::StateWriteFailed { .. }
                | Event::StateWriteRecovered => {}
            }
        }
        for name in &touched {
            self.refresh(name, registry, routing);
        }
    }

    fn backend(&self, adapter: &str, state: &str, in_sync: bool) {
        self.publish(
            "backend",
            &json!({ "type": "backend", "adapter": adapter, "state": state, "in_sync": in_sync }),
        );
    }

    fn plugin(&self, name: &str, state: &str, strategies: &Strategies) {
        self.publish(
            "plugin",
            &json!({
                "type": "plugin",
                "name": name,
                "state": state,
                "plugins": strategies.names().len(),
            }),
        );
    }

    /// Every service the registry or the public view knows, brought up to date: after a gap in
    /// the bus, or at startup.
    fn resync(&self, registry: &Registry, routing: &RoutingTable) {
        let mut names: BTreeSet<ServiceName> =
            registry.services().into_iter().map(|s| s.name).collect();
        names.extend(lock(&self.inner).services.keys().cloned());
        for name in &names {
            self.refresh(name, registry, routing);
        }
    }

    /// Load changes without events; the changed services go out together as one `load` event
    /// so that a busy proxy costs one ring slot per sample, not one per service.
    fn sample_load(&self, registry: &Registry, routing: &RoutingTable) {
        if self.backend != BackendKind::Embedded {
            return;
        }
        let names: Vec<ServiceName> = lock(&self.inner).services.keys().cloned().collect();
        let mut changed = Vec::new();
        for name in names {
            let Some(entry) = registry
                .service(&name)
                .filter(|s| s.public)
                .and_then(|s| self.render(&s, routing))
            else {
                continue;
            };
            let mut inner = lock(&self.inner);
            if let Some(old) = inner.services.get_mut(&name)
                && *old != entry
            {
                *old = entry.clone();
                changed.push(entry);
            }
        }
        if !changed.is_empty() {
            self.publish("load", &json!({ "type": "load", "services": changed }));
        }
    }

    /// The port people open HTTP services on, when Harbor is the proxy.
    pub fn proxy_port(&self) -> Option<u16> {
        self.proxy_port
    }
}

/// Gangway's streams follow the public events as other followers follow the registry's: after
/// a gap, a subscriber starts again from a snapshot.
impl Publishes for PublicView {
    type Entry = PublicEvent;

    fn feed(&self) -> &Feed<PublicEvent> {
        &self.feed
    }
}

/// Fills the view from the registry; returns the bus id it is current as of, for [`follow`].
pub fn build(view: &PublicView, registry: &Registry, routing: &RoutingTable) -> u64 {
    let cursor = registry.bus().last_id();
    view.resync(registry, routing);
    cursor
}

/// Keeps the view in step with the registry from bus event `cursor` on, until cancelled.
pub async fn follow(
    view: Arc<PublicView>,
    registry: Arc<Registry>,
    routing: Arc<RoutingTable>,
    strategies: Arc<Strategies>,
    cursor: u64,
    cancel: CancellationToken,
) {
    let mut events = Follower::new(registry.bus().clone(), cursor);
    let mut sample = tokio::time::interval(LOAD_SAMPLE);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        match events.read() {
            Since::Events(events) => {
                view.apply(
                    events.iter().map(|e| &e.event),
                    &registry,
                    &routing,
                    &strategies,
                );
            }
            Since::Gap => view.resync(&registry, &routing),
        }
        tokio::select! {
            changed = events.changed() => if !changed { return },
            _ = sample.tick() => view.sample_load(&registry, &routing),
            () = cancel.cancelled() => return,
        }
    }
}
