//! Ephemeral instances: registration, renewal, deregistration and expiry of leases, and putting
//! saved instances back after a restart.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{
    Body, Change, Grant, Instance, Registration, Registry, RegistryError, RestoredInstance,
    Service, State, Ticket, release_claims, take_claims,
};
use crate::events::{DeregisterReason, Event, lock};
use crate::model::{Claim, InstanceId, LeaseView, Route, ServiceName, ServiceView};

impl Registry {
    fn check_ttl(&self, ttl: Option<Duration>) -> Result<Duration, RegistryError> {
        let ttl = ttl.unwrap_or(self.limits.default);
        if ttl < self.limits.min || ttl > self.limits.max {
            return Err(RegistryError::TtlOutOfBounds {
                got: ttl,
                min: self.limits.min,
                max: self.limits.max,
            });
        }
        Ok(ttl)
    }

    /// Registers an ephemeral instance, or refreshes the lease of the instance already registered
    /// with the same name and upstream; answers once the change is saved.
    pub async fn register_saved(&self, reg: Registration) -> Result<Grant, RegistryError> {
        let (grant, saved) = self.register_now(reg)?;
        saved.saved().await.map_err(RegistryError::NotSaved)?;
        Ok(grant)
    }

    /// [`Registry::register_saved`], without waiting for the change to be saved.
    pub fn register(&self, reg: Registration) -> Result<Grant, RegistryError> {
        self.register_now(reg).map(|(grant, _)| grant)
    }

    fn register_now(&self, reg: Registration) -> Result<(Grant, Ticket), RegistryError> {
        let ttl = self.check_ttl(reg.ttl)?;
        self.check_strategy(&reg.route.strategy)?;
        self.check_saving()?;
        let now = SystemTime::now();
        let addr = reg.upstream.addr.clone();
        let mut state = lock(&self.state);
        let grant = self.insert_instance(&mut state, reg, None, now, now + ttl, ttl)?;
        let saved = match state.restorable_instance(&grant.name, &addr) {
            Some(instance) => self.journal(Change::Put(Box::new(instance))),
            None => Ticket::done(),
        };
        drop(state);
        if grant.created {
            self.metrics.leases_granted.inc();
        } else {
            self.metrics.leases_renewed.inc();
        }
        self.ephemeral_changed.notify_one();
        Ok((grant, saved))
    }

    /// The services as they would stand after `reg`, which is checked as [`Registry::register`]
    /// checks it but not registered: no lease, no event. What a dry run shows.
    pub fn preview_register(&self, reg: Registration) -> Result<Vec<ServiceView>, RegistryError> {
        let ttl = self.check_ttl(reg.ttl)?;
        self.check_strategy(&reg.route.strategy)?;
        let state = lock(&self.state);
        fits(&state, &reg)?;
        let mut instances = match state.services.get(&reg.name) {
            Some(Service {
                body: Body::Ephemeral(instances),
                ..
            }) => instances.clone(),
            _ => BTreeMap::new(),
        };
        let now = SystemTime::now();
        let id = instances.get(&reg.upstream.addr).map(|i| i.id);
        let instance = Instance::new(
            id,
            reg.upstream.clone(),
            reg.meta,
            now,
            ttl,
            Instant::now() + ttl,
            now + ttl,
        );
        instances.insert(reg.upstream.addr, instance);
        let would = Service {
            route: reg.route,
            body: Body::Ephemeral(instances),
        };
        let mut services: Vec<ServiceView> = state
            .services
            .iter()
            .filter(|(name, _)| **name != reg.name)
            .map(|(name, service)| service.view(name))
            .collect();
        services.push(would.view(&reg.name));
        Ok(services)
    }

    /// Puts back instances from the state file; those whose lease ran out while Harbor was down
    /// are dropped. Returns how many came back.
    pub fn restore(&self, instances: Vec<RestoredInstance>) -> usize {
        let now = SystemTime::now();
        let mut restored = 0;
        let mut state = lock(&self.state);
        for inst in instances {
            let Ok(remaining) = inst.expires_at.duration_since(now) else {
                continue;
            };
            let ttl = inst.registration.ttl.unwrap_or(remaining);
            let name = inst.registration.name.clone();
            match self.insert_instance(
                &mut state,
                inst.registration,
                Some(inst.id),
                inst.registered_at,
                inst.expires_at,
                ttl,
            ) {
                Ok(_) => restored += 1,
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "saved instance not restored")
                }
            }
        }
        restored
    }

    fn insert_instance(
        &self,
        state: &mut State,
        reg: Registration,
        id: Option<InstanceId>,
        registered_at: SystemTime,
        expires_at: SystemTime,
        ttl: Duration,
    ) -> Result<Grant, RegistryError> {
        let remaining = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let deadline = Instant::now() + remaining;
        let name = reg.name.clone();
        let addr = reg.upstream.addr.clone();
        // Decided with shared borrows first; mutated only once the registration is known to fit.
        let existing = fits(state, &reg)?;
        let fresh = || {
            Instance::new(
                id,
                reg.upstream.clone(),
                reg.meta.clone(),
                registered_at,
                ttl,
                deadline,
                expires_at,
            )
        };
        let mut changed = false;
        let (id, created) = match existing {
            Place::Known(id, old_deadline) => {
                state.leases.remove(old_deadline, id);
                if let Some(svc) = state.services.get_mut(&name)
                    && svc.route != reg.route
                {
                    let old = std::mem::replace(&mut svc.route, reg.route.clone());
                    release_claims(&mut state.claims, &name, &old);
                    take_claims(&mut state.claims, &name, &reg.route);
                    changed = true;
                }
                if let Some(inst) = state.instance_mut(&name, &addr) {
                    changed |= inst.upstream != reg.upstream || inst.meta != reg.meta;
                    inst.upstream = reg.upstream;
                    inst.meta = reg.meta;
                    inst.ttl = ttl;
                    inst.deadline = deadline;
                    inst.expires_at = expires_at;
                }
                (id, false)
            }
            Place::Joins => {
                let inst = fresh();
                let id = inst.id;
                if let Some(Service {
                    body: Body::Ephemeral(instances),
                    ..
                }) = state.services.get_mut(&name)
                {
                    instances.insert(addr.clone(), inst);
                }
                (id, true)
            }
            Place::New => {
                let inst = fresh();
                let id = inst.id;
                take_claims(&mut state.claims, &name, &reg.route);
                let body = Body::Ephemeral(BTreeMap::from([(addr.clone(), inst)]));
                state.services.insert(
                    name.clone(),
                    Service {
                        route: reg.route,
                        body,
                    },
                );
                if let Some(service) = state.view(&name) {
                    self.bus.publish(Event::ServiceAdded { service });
                }
                (id, true)
            }
        };

        if changed && let Some(service) = state.view(&name) {
            self.bus.publish(Event::ServiceUpdated { service });
        }
        if created {
            if let Some(instance) = state.instance_mut(&name, &addr).map(|i| i.view()) {
                self.bus.publish(Event::InstanceRegistered {
                    name: name.clone(),
                    instance,
                });
            }
        } else {
            self.bus.publish(Event::InstanceRenewed {
                name: name.clone(),
                id,
                lease: LeaseView::new(ttl, expires_at),
            });
        }
        state.instances.insert(id, (name.clone(), addr));
        if state.leases.insert(deadline, id) {
            self.reaper_wake.notify_one();
        }
        Ok(Grant {
            id,
            name,
            ttl,
            expires_at,
            created,
        })
    }

    /// Extends a lease by its TTL (or a new TTL) from now; answers once the change is saved.
    pub async fn renew_saved(
        &self,
        id: InstanceId,
        ttl: Option<Duration>,
    ) -> Result<Grant, RegistryError> {
        let (grant, saved) = self.renew_now(id, ttl)?;
        saved.saved().await.map_err(RegistryError::NotSaved)?;
        Ok(grant)
    }

    /// [`Registry::renew_saved`], without waiting for the change to be saved.
    pub fn renew(&self, id: InstanceId, ttl: Option<Duration>) -> Result<Grant, RegistryError> {
        self.renew_now(id, ttl).map(|(grant, _)| grant)
    }

    fn renew_now(
        &self,
        id: InstanceId,
        ttl: Option<Duration>,
    ) -> Result<(Grant, Ticket), RegistryError> {
        self.check_saving()?;
        let mut state = lock(&self.state);
        let (name, addr) = state
            .instances
            .get(&id)
            .cloned()
            .ok_or(RegistryError::UnknownInstance(id))?;
        let inst = state
            .instance_mut(&name, &addr)
            .ok_or(RegistryError::UnknownInstance(id))?;
        let ttl = match ttl {
            Some(ttl) => self.check_ttl(Some(ttl))?,
            None => inst.ttl,
        };
        let old_deadline = inst.deadline;
        inst.ttl = ttl;
        inst.deadline = Instant::now() + ttl;
        inst.expires_at = SystemTime::now() + ttl;
        let (deadline, expires_at) = (inst.deadline, inst.expires_at);
        state.leases.remove(old_deadline, id);
        state.leases.insert(deadline, id);
        self.bus.publish(Event::InstanceRenewed {
            name: name.clone(),
            id,
            lease: LeaseView::new(ttl, expires_at),
        });
        let saved = match state.restorable_instance(&name, &addr) {
            Some(instance) => self.journal(Change::Put(Box::new(instance))),
            None => Ticket::done(),
        };
        drop(state);
        // Renewals only push deadlines later, so the reaper never needs waking for one.
        self.metrics.leases_renewed.inc();
        self.ephemeral_changed.notify_one();
        let grant = Grant {
            id,
            name,
            ttl,
            expires_at,
            created: false,
        };
        Ok((grant, saved))
    }

    /// The service an instance belongs to, if the instance is live.
    pub fn instance_service(&self, id: InstanceId) -> Option<ServiceName> {
        lock(&self.state).instances.get(&id).map(|(n, _)| n.clone())
    }

    /// Removes an instance; answers once the removal is saved.
    pub async fn deregister_saved(&self, id: InstanceId) -> Result<ServiceName, RegistryError> {
        let (name, saved) = self.deregister_now(id)?;
        saved.saved().await.map_err(RegistryError::NotSaved)?;
        Ok(name)
    }

    /// [`Registry::deregister_saved`], without waiting for the removal to be saved.
    pub fn deregister(&self, id: InstanceId) -> Result<ServiceName, RegistryError> {
        self.deregister_now(id).map(|(name, _)| name)
    }

    fn deregister_now(&self, id: InstanceId) -> Result<(ServiceName, Ticket), RegistryError> {
        self.check_saving()?;
        let mut state = lock(&self.state);
        let inst = state
            .remove_instance(id)
            .ok_or(RegistryError::UnknownInstance(id))?;
        let saved = self.journal(Change::Remove(id));
        self.bus.publish(Event::InstanceDeregistered {
            name: inst.0.clone(),
            id,
            upstream: inst.1.upstream.addr.clone(),
            reason: DeregisterReason::Request,
        });
        self.remove_if_empty(&mut state, &inst.0);
        drop(state);
        self.metrics.instances_deregistered.inc();
        self.ephemeral_changed.notify_one();
        Ok((inst.0, saved))
    }

    /// Expires every lease whose deadline has passed; returns the next deadline.
    pub fn expire_due(&self, now: Instant) -> Option<Instant> {
        let mut state = lock(&self.state);
        let mut expired = 0;
        while let Some((deadline, id)) = state.leases.pop_due(now) {
            let Some((name, inst)) = state.remove_instance(id) else {
                continue;
            };
            self.metrics
                .lease_expiry_lateness
                .observe(now.saturating_duration_since(deadline).as_secs_f64());
            tracing::info!(service = %name, id = %id, upstream = %inst.upstream.addr, "lease expired");
            self.bus.publish(Event::InstanceExpired {
                name: name.clone(),
                id,
                upstream: inst.upstream.addr,
            });
            self.remove_if_empty(&mut state, &name);
            // Not waited for: a restart drops a lease that has run out by its own clock.
            let _ = self.journal(Change::Remove(id));
            expired += 1;
        }
        let next = state.leases.next_deadline();
        drop(state);
        if expired > 0 {
            self.metrics.leases_expired.inc_by(expired);
            self.ephemeral_changed.notify_one();
        }
        next
    }

    fn remove_if_empty(&self, state: &mut State, name: &ServiceName) {
        let empty = matches!(
            state.services.get(name),
            Some(Service { body: Body::Ephemeral(i), .. }) if i.is_empty()
        );
        if empty {
            if let Some(svc) = state.services.remove(name) {
                release_claims(&mut state.claims, name, &svc.route);
            }
            self.bus
                .publish(Event::ServiceRemoved { name: name.clone() });
        }
    }

    /// Every live ephemeral instance, for the state file.
    pub fn ephemeral_instances(&self) -> Vec<RestoredInstance> {
        let state = lock(&self.state);
        let mut out = Vec::with_capacity(state.instances.len());
        for name in state.services.keys() {
            out.extend(state.restorable(name));
        }
        out
    }

    pub fn live_leases(&self) -> usize {
        lock(&self.state).leases.len()
    }
}

fn check_claims(
    claims: &HashMap<Claim, ServiceName>,
    name: &ServiceName,
    route: &Route,
) -> Result<(), RegistryError> {
    for claim in route.claims() {
        if let Some((claim, owner)) = crate::model::conflict(claims, name, &claim) {
            return Err(RegistryError::Claimed {
                claim,
                owner: owner.clone(),
            });
        }
    }
    Ok(())
}

/// Names the first routing field in which two routes differ, for the error a client sees.
fn route_difference(a: &Route, b: &Route) -> &'static str {
    use crate::model::Match;
    match (&a.matcher, &b.matcher) {
        (
            Match::Http {
                hosts: ha,
                path: pa,
            },
            Match::Http {
                hosts: hb,
                path: pb,
            },
        ) => {
            if ha != hb {
                return "hosts";
            }
            if pa != pb {
                return "path";
            }
        }
        (
            Match::Tcp {
                listen: la,
                hosts: ha,
                passthrough: pa,
            },
            Match::Tcp {
                listen: lb,
                hosts: hb,
                passthrough: pb,
            },
        ) => {
            if pa != pb {
                return "protocol";
            }
            if la != lb {
                return "listen";
            }
            if ha != hb {
                return "hosts";
            }
        }
        _ => return "protocol",
    }
    if a.strategy != b.strategy {
        "strategy"
    } else if a.strategy_settings != b.strategy_settings {
        crate::model::SETTINGS_FIELD
    } else if a.tls != b.tls {
        "tls"
    } else {
        "public"
    }
}
/// Where a registration goes, as the registry stands.
enum Place {
    /// The same upstream is registered already: a refresh of that instance.
    Known(InstanceId, Instant),
    /// A new instance of a known service.
    Joins,
    /// A new service.
    New,
}

/// Where `reg` would go, or why it cannot: a name a route file owns, a route that differs from
/// the service's (unless this instance is its only one), or another service's hosts or ports.
fn fits(state: &State, reg: &Registration) -> Result<Place, RegistryError> {
    let name = &reg.name;
    match state.services.get(name) {
        Some(Service {
            body: Body::Static(..),
            ..
        }) => Err(RegistryError::StaticName(name.clone())),
        Some(Service {
            route,
            body: Body::Ephemeral(instances),
        }) => {
            let same = instances
                .get(&reg.upstream.addr)
                .map(|i| (i.id, i.deadline));
            if *route != reg.route {
                let alone = instances.len() == 1 && same.is_some();
                if !alone {
                    return Err(RegistryError::RouteMismatch {
                        field: route_difference(route, &reg.route),
                        name: name.clone(),
                    });
                }
                check_claims(&state.claims, name, &reg.route)?;
            }
            Ok(same.map_or(Place::Joins, |(id, deadline)| Place::Known(id, deadline)))
        }
        None => {
            check_claims(&state.claims, name, &reg.route)?;
            Ok(Place::New)
        }
    }
}
