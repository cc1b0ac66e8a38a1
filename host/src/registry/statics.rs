//! Applying a scan of the routes directory: the registry's static services are brought to what the
//! files say, except that a file in error keeps its last good version in force.

use std::collections::{BTreeMap, HashMap};

use super::{Body, Registry, Service, State, release_claims, take_claims};
use crate::events::{DeregisterReason, Event, RouteFileError, lock};
use crate::model::{Claim, Meta, Route, ServiceName, Upstream};

/// A static service as a route file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticSpec {
    pub route: Route,
    pub upstreams: Vec<Upstream>,
    pub meta: Meta,
}

/// One `.route` file as read from disk.
#[derive(Debug, Clone)]
pub struct RouteFile {
    /// The path as reported to people.
    pub file: String,
    /// The service the file name declares; `None` if the name is not a valid service name.
    pub name: Option<ServiceName>,
    pub parsed: Result<ParsedRoute, RouteFileError>,
}

#[derive(Debug, Clone)]
pub struct ParsedRoute {
    pub spec: StaticSpec,
    /// Where each top-level key stands in the file (line, column), to point at a conflict.
    pub positions: HashMap<&'static str, (usize, usize)>,
}

impl ParsedRoute {
    /// An error about `field` of this file, placed where the field stands in it.
    pub fn error_at(&self, file: &str, field: &str, reason: String) -> RouteFileError {
        let (line, column) = self.positions.get(field).copied().unzip();
        RouteFileError {
            file: file.to_owned(),
            line,
            column,
            field: Some(field.to_owned()),
            reason,
        }
    }
}

impl Registry {
    /// Makes the static services match a full scan of the routes directory.
    pub fn apply_routes(&self, mut files: Vec<RouteFile>) {
        files.sort_by(|a, b| a.file.cmp(&b.file));
        let mut state = lock(&self.state);
        let known = |s: &str| self.strategy_known.get().is_none_or(|check| check(s));
        let (accepted, errors) = resolve(&state, &files, &known);
        self.converge_statics(&mut state, accepted);
        self.converge_errors(&mut state, errors);
    }

    fn converge_statics(
        &self,
        state: &mut State,
        accepted: BTreeMap<ServiceName, (StaticSpec, String)>,
    ) {
        let gone: Vec<ServiceName> = state
            .services
            .iter()
            .filter(|(name, svc)| {
                matches!(svc.body, Body::Static(..)) && !accepted.contains_key(*name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(svc) = state.services.remove(&name) {
                release_claims(&mut state.claims, &name, &svc.route);
                tracing::info!(service = %name, "static service removed");
                self.bus.publish(Event::ServiceRemoved { name });
            }
        }

        for (name, (spec, file)) in accepted {
            let event = match state.services.get(&name) {
                Some(Service {
                    body: Body::Static(old, old_file),
                    ..
                }) if **old == spec && *old_file == file => continue,
                Some(Service {
                    body: Body::Static(..),
                    ..
                }) => "updated",
                Some(Service {
                    body: Body::Ephemeral(_),
                    ..
                }) => {
                    self.evict_ephemeral(state, &name);
                    "added"
                }
                None => "added",
            };
            if let Some(old) = state.services.remove(&name) {
                release_claims(&mut state.claims, &name, &old.route);
            }
            take_claims(&mut state.claims, &name, &spec.route);
            let route = spec.route.clone();
            state.services.insert(
                name.clone(),
                Service {
                    route,
                    body: Body::Static(Box::new(spec), file),
                },
            );
            tracing::info!(service = %name, "static service {event}");
            if let Some(service) = state.view(&name) {
                self.bus.publish(if event == "added" {
                    Event::ServiceAdded { service }
                } else {
                    Event::ServiceUpdated { service }
                });
            }
        }
    }

    /// A route file now declares this name: the file is the operator's word, so the ephemeral
    /// instances give way and their clients get 404 on their next renewal.
    fn evict_ephemeral(&self, state: &mut State, name: &ServiceName) {
        let ids: Vec<_> = match state.services.get(name).map(|s| &s.body) {
            Some(Body::Ephemeral(instances)) => instances.values().map(|i| i.id).collect(),
            _ => return,
        };
        tracing::warn!(service = %name, instances = ids.len(), "a route file takes over an ephemeral service");
        for id in ids {
            if let Some((name, inst)) = state.remove_instance(id) {
                self.bus.publish(Event::InstanceDeregistered {
                    name,
                    id,
                    upstream: inst.upstream.addr,
                    reason: DeregisterReason::ReplacedByStatic,
                });
            }
        }
        self.ephemeral_changed.notify_one();
    }

    /// The routes directory is gone (deleted, or a symlink to nowhere): the static services read
    /// from it stay in force, as a bad file's last good version does, and a route error says so
    /// until the directory is read again.
    pub fn routes_dir_missing(&self, dir: &str) {
        let mut state = lock(&self.state);
        let mut errors = state.route_errors.clone();
        errors.insert(
            dir.to_owned(),
            RouteFileError {
                file: dir.to_owned(),
                line: None,
                column: None,
                field: None,
                reason: "the routes directory does not exist; the static services read from it stay in force until it is back".to_owned(),
            },
        );
        self.converge_errors(&mut state, errors);
    }

    fn converge_errors(&self, state: &mut State, errors: BTreeMap<String, RouteFileError>) {
        let recovered: Vec<String> = state
            .route_errors
            .keys()
            .filter(|f| !errors.contains_key(*f))
            .cloned()
            .collect();
        for file in recovered {
            state.route_errors.remove(&file);
            tracing::info!(file = %file, "route file error cleared");
            self.bus.publish(Event::RouteFileRecovered { file });
        }
        for (file, error) in errors {
            if state.route_errors.get(&file) == Some(&error) {
                continue;
            }
            tracing::warn!(file = %error.file, line = error.line, reason = %error.reason, "route file rejected; its last good version stays in force");
            self.metrics.route_file_errors.inc();
            state.route_errors.insert(file, error.clone());
            self.bus.publish(Event::RouteFileError { error });
        }
    }
}

/// Decides which static services the scan puts in force and which files are in error.
///
/// Claims are settled in a fixed order so the outcome depends on neither timing nor history:
/// ephemeral services keep what they hold; files then take what is free, in file-name order; a
/// file that cannot have what it asks keeps its previous version if that still fits.
fn resolve(
    state: &State,
    files: &[RouteFile],
    strategy_known: &dyn Fn(&str) -> bool,
) -> (
    BTreeMap<ServiceName, (StaticSpec, String)>,
    BTreeMap<String, RouteFileError>,
) {
    let mut taken: HashMap<Claim, ServiceName> = HashMap::new();
    for (name, svc) in &state.services {
        if matches!(svc.body, Body::Ephemeral(_)) {
            for claim in svc.route.claims() {
                taken.insert(claim, name.clone());
            }
        }
    }

    let mut accepted = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let mut pending = Vec::new();
    for f in files {
        let Some(name) = &f.name else {
            if let Err(e) = &f.parsed {
                errors.insert(f.file.clone(), e.clone());
            }
            continue;
        };
        // Files claim hosts and ports in the order of their names, whichever came first:
        // the same files give the same winner at every start.
        match &f.parsed {
            Ok(p) => pending.push((name, f, Some(p))),
            Err(e) => {
                errors.insert(f.file.clone(), e.clone());
                pending.push((name, f, None));
            }
        }
    }

    // Ephemeral services that a valid file takes over release their claims to it.
    for (name, _, parsed) in &pending {
        if parsed.is_some() {
            taken.retain(|_, owner| owner != *name);
        }
    }

    for (name, f, parsed) in pending {
        if let Some(p) = parsed {
            let strategy = p.spec.route.strategy.as_str();
            if !strategy_known(strategy) {
                let reason = format!("no strategy named {strategy:?} is loaded");
                errors.insert(f.file.clone(), p.error_at(&f.file, "strategy", reason));
                keep_previous(state, &mut taken, &mut accepted, name, &f.file);
                continue;
            }
            match first_conflict(&taken, name, &p.spec.route) {
                None => {
                    claim_all(&mut taken, name, &p.spec.route);
                    accepted.insert(name.clone(), (p.spec.clone(), f.file.clone()));
                    continue;
                }
                Some((claim, owner)) => {
                    let reason = format!("{claim} is already taken by service {owner:?}");
                    errors.insert(f.file.clone(), p.error_at(&f.file, claim.field(), reason));
                }
            }
        }
        keep_previous(state, &mut taken, &mut accepted, name, &f.file);
    }
    (accepted, errors)
}

/// A file in error keeps the version it had in force, if that still fits.
fn keep_previous(
    state: &State,
    taken: &mut HashMap<Claim, ServiceName>,
    accepted: &mut BTreeMap<ServiceName, (StaticSpec, String)>,
    name: &ServiceName,
    file: &str,
) {
    if let Some(Body::Static(old, old_file)) = state.services.get(name).map(|s| &s.body)
        && old_file == file
        && first_conflict(taken, name, &old.route).is_none()
    {
        claim_all(taken, name, &old.route);
        accepted.insert(name.clone(), ((**old).clone(), old_file.clone()));
    }
}

fn first_conflict(
    taken: &HashMap<Claim, ServiceName>,
    name: &ServiceName,
    route: &Route,
) -> Option<(Claim, ServiceName)> {
    route.claims().into_iter().find_map(|claim| {
        crate::model::conflict(taken, name, &claim).map(|(claim, owner)| (claim, owner.clone()))
    })
}

fn claim_all(taken: &mut HashMap<Claim, ServiceName>, name: &ServiceName, route: &Route) {
    for claim in route.claims() {
        taken.insert(claim, name.clone());
    }
}
