//! The registry: the desired state every consumer converges to. Services, their instances, leases
//! and the claims (host + path, listen address) that only one service may hold all live under one
//! lock; every change is published on the event bus while that lock is held, so a snapshot and the
//! events after it never disagree.

mod durable;
mod ephemeral;
mod lease;
mod statics;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

pub use durable::{Change, Journal, SetAside, StateCondition, Ticket};
pub use lease::{LeaseLimits, reaper};
pub use statics::{ParsedRoute, RouteFile, StaticSpec};

use crate::events::{Event, EventBus, RouteFileError, lock};
use crate::metrics::Metrics;
use crate::model::{
    Claim, InstanceId, InstanceView, Kind, LeaseView, Meta, Route, RouteView, ServiceName,
    ServiceView, StrategyName, StrategySettings, Upstream, UpstreamAddr,
};
use lease::DeadlineQueue;

/// An ephemeral instance to register.
#[derive(Debug, Clone)]
pub struct Registration {
    pub name: ServiceName,
    pub upstream: Upstream,
    pub route: Route,
    pub ttl: Option<Duration>,
    pub meta: Meta,
}

/// A granted or renewed lease.
#[derive(Debug, Clone)]
pub struct Grant {
    pub id: InstanceId,
    pub name: ServiceName,
    pub ttl: Duration,
    pub expires_at: SystemTime,
    /// False when the registration refreshed an existing instance.
    pub created: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no live instance has id {0}")]
    UnknownInstance(InstanceId),
    #[error("service {0:?} is declared by a route file; ephemeral instances may not join it")]
    StaticName(ServiceName),
    #[error("{claim} is already taken by service {owner:?}")]
    Claimed { claim: Claim, owner: ServiceName },
    #[error(
        "{field} differs from the other instances of service {name:?}; instances of one service share its routing"
    )]
    RouteMismatch {
        field: &'static str,
        name: ServiceName,
    },
    #[error("no strategy named {0:?} is loaded")]
    UnknownStrategy(StrategyName),
    #[error("no service named {0:?}")]
    UnknownService(ServiceName),
    #[error("ttl_secs must be from {} to {}, got {}", .min.as_secs(), .max.as_secs(), .got.as_secs())]
    TtlOutOfBounds {
        got: Duration,
        min: Duration,
        max: Duration,
    },
    #[error("the change could not be saved, so it is not acknowledged: {0}")]
    NotSaved(String),
}

impl RegistryError {
    pub fn field(&self) -> Option<&'static str> {
        match self {
            RegistryError::UnknownInstance(_) => Some("id"),
            RegistryError::StaticName(_) => Some("name"),
            RegistryError::Claimed { claim, .. } => Some(claim.field()),
            RegistryError::RouteMismatch { field, .. } => Some(field),
            RegistryError::TtlOutOfBounds { .. } => Some("ttl_secs"),
            RegistryError::UnknownStrategy(_) => Some("strategy"),
            RegistryError::UnknownService(_) => Some("name"),
            RegistryError::NotSaved(_) => None,
        }
    }
}

/// An instance as the state file keeps it: deadlines as wall-clock times, so a restart neither
/// extends nor shortens a lease.
#[derive(Debug, Clone)]
pub struct RestoredInstance {
    pub id: InstanceId,
    pub registration: Registration,
    pub registered_at: SystemTime,
    pub expires_at: SystemTime,
}

/// Everything a new event-stream subscriber needs, consistent with the event id it carries.
pub struct Snapshot {
    pub last_event_id: u64,
    pub services: Vec<ServiceView>,
    pub route_errors: Vec<RouteFileError>,
    /// How the saved state stands (a failure to save, a state file set aside).
    pub state: StateCondition,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub static_services: usize,
    pub ephemeral_services: usize,
    pub instances: usize,
    pub route_errors: usize,
}

pub struct Registry {
    state: Mutex<State>,
    bus: Arc<EventBus>,
    metrics: Arc<Metrics>,
    limits: LeaseLimits,
    reaper_wake: Notify,
    ephemeral_changed: Notify,
    /// Whether a strategy name is loaded; every name is accepted until this is set.
    strategy_known: std::sync::OnceLock<StrategyCheck>,
    /// Whether a strategy accepts a route file's settings; every setting is accepted until
    /// this is set. It runs the strategy's code, so it is called where blocking is allowed
    /// (the route scan), never under the state's lock.
    settings_check: std::sync::OnceLock<SettingsCheck>,
    /// Where changes to ephemeral instances are made durable; none in tests that need no disk.
    journal: std::sync::OnceLock<Arc<dyn Journal>>,
}

pub type StrategyCheck = Box<dyn Fn(&str) -> bool + Send + Sync>;
/// `Err` carries the strategy's reason for refusing the settings.
pub type SettingsCheck = Arc<dyn Fn(&str, &StrategySettings) -> Result<(), String> + Send + Sync>;

#[derive(Default)]
struct State {
    services: BTreeMap<ServiceName, Service>,
    instances: HashMap<InstanceId, (ServiceName, UpstreamAddr)>,
    leases: DeadlineQueue,
    claims: HashMap<Claim, ServiceName>,
    route_errors: BTreeMap<String, RouteFileError>,
    /// Route files whose tcp listen address cannot be bound, by service; kept apart from the
    /// files' own errors, which each scan recomputes.
    listen_errors: BTreeMap<ServiceName, RouteFileError>,
}

struct Service {
    route: Route,
    body: Body,
}

enum Body {
    // Boxed: a static spec is large and most services of a busy host are ephemeral.
    Static(Box<StaticSpec>, String),
    Ephemeral(BTreeMap<UpstreamAddr, Instance>),
}

#[derive(Debug, Clone)]
struct Instance {
    id: InstanceId,
    upstream: Upstream,
    meta: Meta,
    registered_at: SystemTime,
    ttl: Duration,
    deadline: Instant,
    expires_at: SystemTime,
}

impl Instance {
    fn new(
        id: Option<InstanceId>,
        upstream: Upstream,
        meta: Meta,
        registered_at: SystemTime,
        ttl: Duration,
        deadline: Instant,
        expires_at: SystemTime,
    ) -> Self {
        Self {
            id: id.unwrap_or_else(InstanceId::random),
            upstream,
            meta,
            registered_at,
            ttl,
            deadline,
            expires_at,
        }
    }

    fn restorable(&self, name: &ServiceName, route: &Route) -> RestoredInstance {
        RestoredInstance {
            id: self.id,
            registration: Registration {
                name: name.clone(),
                upstream: self.upstream.clone(),
                route: route.clone(),
                ttl: Some(self.ttl),
                meta: self.meta.clone(),
            },
            registered_at: self.registered_at,
            expires_at: self.expires_at,
        }
    }

    fn view(&self) -> InstanceView {
        InstanceView {
            id: self.id,
            upstream: self.upstream.addr.clone(),
            weight: self.upstream.weight,
            registered_at: self.registered_at,
            lease: LeaseView::new(self.ttl, self.expires_at),
            meta: self.meta.clone(),
        }
    }
}

impl Registry {
    pub fn new(bus: Arc<EventBus>, metrics: Arc<Metrics>, limits: LeaseLimits) -> Self {
        Self {
            state: Mutex::new(State::default()),
            bus,
            metrics,
            limits,
            reaper_wake: Notify::new(),
            ephemeral_changed: Notify::new(),
            strategy_known: std::sync::OnceLock::new(),
            settings_check: std::sync::OnceLock::new(),
            journal: std::sync::OnceLock::new(),
        }
    }

    /// Makes every later change to an ephemeral instance go through `journal`.
    pub fn set_journal(&self, journal: Arc<dyn Journal>) {
        if self.journal.set(journal).is_err() {
            tracing::warn!("the registry's journal was already set");
        }
    }

    /// How the saved state stands.
    pub fn state_condition(&self) -> StateCondition {
        self.journal
            .get()
            .map(|j| j.condition())
            .unwrap_or_default()
    }

    /// Refuses a change before it is made when changes cannot be saved now.
    fn check_saving(&self) -> Result<(), RegistryError> {
        match self.journal.get().and_then(|j| j.refuses()) {
            Some(reason) => Err(RegistryError::NotSaved(reason)),
            None => Ok(()),
        }
    }

    /// Queues `change` for the journal, in the order changes are made (the state is locked).
    fn journal(&self, change: Change) -> Ticket {
        match self.journal.get() {
            Some(j) => j.append(change),
            None => Ticket::done(),
        }
    }

    /// Makes registrations, route files and strategy changes name only loaded strategies.
    pub fn set_strategy_check(&self, check: StrategyCheck) {
        if self.strategy_known.set(check).is_err() {
            tracing::warn!("the strategy check was already set");
        }
    }

    /// Makes route files' strategy settings pass their strategy's check.
    pub fn set_settings_check(&self, check: SettingsCheck) {
        if self.settings_check.set(check).is_err() {
            tracing::warn!("the settings check was already set");
        }
    }

    /// The check route files' settings must pass, if one is set.
    pub fn settings_check(&self) -> Option<SettingsCheck> {
        self.settings_check.get().cloned()
    }

    /// Refuses a strategy that is not loaded.
    pub fn check_strategy(&self, strategy: &StrategyName) -> Result<(), RegistryError> {
        match self.strategy_known.get() {
            Some(known) if !known(strategy.as_str()) => {
                Err(RegistryError::UnknownStrategy(strategy.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Changes a service's strategy at runtime. For a static service this lasts until its
    /// route file changes.
    pub async fn set_strategy(
        &self,
        name: &ServiceName,
        strategy: StrategyName,
        settings: Option<StrategySettings>,
    ) -> Result<ServiceView, RegistryError> {
        let (view, saved) = self.set_strategy_now(name, strategy, settings)?;
        saved.saved().await.map_err(RegistryError::NotSaved)?;
        Ok(view)
    }

    /// Changes the strategy in memory; the ticket says when an ephemeral service's instances,
    /// which carry it, are saved with it.
    fn set_strategy_now(
        &self,
        name: &ServiceName,
        strategy: StrategyName,
        settings: Option<StrategySettings>,
    ) -> Result<(ServiceView, Ticket), RegistryError> {
        self.check_strategy(&strategy)?;
        self.check_saving()?;
        let mut state = lock(&self.state);
        let svc = state
            .services
            .get_mut(name)
            .ok_or_else(|| RegistryError::UnknownService(name.clone()))?;
        let ephemeral = matches!(svc.body, Body::Ephemeral(_));
        let settings = settings.unwrap_or_else(|| svc.route.strategy_settings.clone());
        if svc.route.strategy != strategy || svc.route.strategy_settings != settings {
            svc.route.strategy = strategy;
            svc.route.strategy_settings = settings;
            if let Some(service) = state.view(name) {
                self.bus.publish(Event::ServiceUpdated { service });
            }
        }
        let view = state
            .view(name)
            .ok_or_else(|| RegistryError::UnknownService(name.clone()))?;
        // Each instance carries its service's route: saved again, the last one's ticket
        // answers for all of them.
        let mut saved = Ticket::done();
        for instance in state.restorable(name) {
            saved = self.journal(Change::Put(Box::new(instance)));
        }
        drop(state);
        if ephemeral {
            self.ephemeral_changed.notify_one();
        }
        Ok((view, saved))
    }

    pub fn bus(&self) -> &Arc<EventBus> {
        &self.bus
    }

    pub fn limits(&self) -> LeaseLimits {
        self.limits
    }

    /// Resolves when ephemeral state (instances, leases) has changed since the last call.
    pub async fn ephemeral_changed(&self) {
        self.ephemeral_changed.notified().await
    }

    pub fn services(&self) -> Vec<ServiceView> {
        let state = lock(&self.state);
        state
            .services
            .keys()
            .filter_map(|name| state.view(name))
            .collect()
    }

    pub fn service(&self, name: &ServiceName) -> Option<ServiceView> {
        lock(&self.state).view(name)
    }

    pub fn route_errors(&self) -> Vec<RouteFileError> {
        let state = lock(&self.state);
        state
            .route_errors
            .values()
            .chain(state.listen_errors.values())
            .cloned()
            .collect()
    }

    /// Harbor's TCP proxy cannot listen where static service `name` asks (`None`: it can
    /// again): reported as an error of its route file, as a bad file is.
    pub fn listen_failed(&self, name: &ServiceName, reason: Option<String>) {
        let mut state = lock(&self.state);
        let file = match state.services.get(name).map(|s| &s.body) {
            Some(Body::Static(_, file)) => file.clone(),
            _ => {
                state.listen_errors.remove(name);
                return;
            }
        };
        match reason {
            Some(reason) => {
                let error = RouteFileError {
                    file: file.clone(),
                    line: None,
                    column: None,
                    field: Some("listen".to_owned()),
                    reason,
                };
                if state.listen_errors.get(name) != Some(&error) {
                    tracing::warn!(file = %file, reason = %error.reason, "a route file's listen address cannot be bound");
                    state.listen_errors.insert(name.clone(), error.clone());
                    self.bus.publish(Event::RouteFileError { error });
                }
            }
            None => {
                if state.listen_errors.remove(name).is_some() {
                    self.bus.publish(Event::RouteFileRecovered { file });
                }
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = lock(&self.state);
        Snapshot {
            last_event_id: self.bus.last_id(),
            services: state
                .services
                .keys()
                .filter_map(|name| state.view(name))
                .collect(),
            route_errors: state
                .route_errors
                .values()
                .chain(state.listen_errors.values())
                .cloned()
                .collect(),
            state: self.state_condition(),
        }
    }

    pub fn counts(&self) -> Counts {
        let state = lock(&self.state);
        let mut counts = Counts {
            instances: state.instances.len(),
            route_errors: state.route_errors.len() + state.listen_errors.len(),
            ..Counts::default()
        };
        for svc in state.services.values() {
            match svc.body {
                Body::Static(..) => counts.static_services += 1,
                Body::Ephemeral(_) => counts.ephemeral_services += 1,
            }
        }
        counts
    }
}

impl State {
    fn view(&self, name: &ServiceName) -> Option<ServiceView> {
        Some(self.services.get(name)?.view(name))
    }
}

impl Service {
    fn view(&self, name: &ServiceName) -> ServiceView {
        let mut view = ServiceView {
            name: name.clone(),
            kind: Kind::Static,
            route: RouteView::from(&self.route),
            public: self.route.public,
            upstreams: Vec::new(),
            instances: Vec::new(),
            meta: Meta::new(),
            source: None,
            proxy: self.route.options.clone(),
        };
        match &self.body {
            Body::Static(spec, file) => {
                view.upstreams = spec.upstreams.clone();
                view.meta = spec.meta.clone();
                view.source = Some(file.clone());
            }
            Body::Ephemeral(instances) => {
                view.kind = Kind::Ephemeral;
                view.upstreams = instances.values().map(|i| i.upstream.clone()).collect();
                view.instances = instances.values().map(Instance::view).collect();
            }
        }
        view
    }
}

impl State {
    /// The instances of ephemeral service `name`, as the state file keeps them.
    fn restorable(&self, name: &ServiceName) -> Vec<RestoredInstance> {
        let Some(Service {
            route,
            body: Body::Ephemeral(instances),
        }) = self.services.get(name)
        else {
            return Vec::new();
        };
        instances
            .values()
            .map(|inst| inst.restorable(name, route))
            .collect()
    }

    /// One instance, as the state file keeps it.
    fn restorable_instance(
        &self,
        name: &ServiceName,
        addr: &UpstreamAddr,
    ) -> Option<RestoredInstance> {
        let svc = self.services.get(name)?;
        let Body::Ephemeral(instances) = &svc.body else {
            return None;
        };
        Some(instances.get(addr)?.restorable(name, &svc.route))
    }

    fn instance_mut(&mut self, name: &ServiceName, addr: &UpstreamAddr) -> Option<&mut Instance> {
        match &mut self.services.get_mut(name)?.body {
            Body::Ephemeral(instances) => instances.get_mut(addr),
            Body::Static(..) => None,
        }
    }

    /// Removes an instance and its lease, leaving its service (perhaps empty) in place.
    fn remove_instance(&mut self, id: InstanceId) -> Option<(ServiceName, Instance)> {
        let (name, addr) = self.instances.remove(&id)?;
        let Body::Ephemeral(instances) = &mut self.services.get_mut(&name)?.body else {
            return None;
        };
        let inst = instances.remove(&addr)?;
        self.leases.remove(inst.deadline, id);
        Some((name, inst))
    }
}

fn take_claims(claims: &mut HashMap<Claim, ServiceName>, name: &ServiceName, route: &Route) {
    for claim in route.claims() {
        claims.insert(claim, name.clone());
    }
}

fn release_claims(claims: &mut HashMap<Claim, ServiceName>, name: &ServiceName, route: &Route) {
    for claim in route.claims() {
        if claims.get(&claim) == Some(name) {
            claims.remove(&claim);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
