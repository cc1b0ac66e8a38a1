//! Caddy's admin API through the host's bound HTTP client. Every write is conditional
//! (`If-Match` with the `ETag` of the read it is based on), so a concurrent change by someone
//! else makes the write fail with `412` and the adapter reads again instead of overwriting it.
//!
//! Caddy takes or refuses a configuration whole. When it refuses Harbor's routes, the adapter
//! finds the services it refuses by halving the routes offered (about two writes per halving),
//! applies the rest, and reports those services with Caddy's reason; it does not offer the same
//! route again.

use std::collections::HashMap;

use serde_json::{Value, json};

use harbor_adapter_common::bindings::exports::harbor::backend::adapter::{
    AdapterError, DesiredState, Document, ProbeReport,
};
use harbor_adapter_common::bindings::harbor::backend::http_client::{self, HttpError, Response};
use harbor_adapter_common::bindings::harbor::backend::log::{self, Level};
use harbor_adapter_common::bindings::harbor::backend::types::{Applied, RefusedService};
use harbor_adapter_common::http_services;

use crate::routes::{self, Fallbacks, Features, Service, Settings, service_of};
use crate::tls::{self, Issuers, Plan as TlsPlan};

/// Conditional writes retried after a `412` before the apply is given up (and retried later).
const MAX_CONFLICTS: usize = 5;

pub struct Admin {
    settings: Settings,
    features: Features,
    /// Harbor's inner routes as Caddy holds them (as written, or as read); `None` until known,
    /// and again once a probe finds them changed.
    live: Option<Value>,
    /// The revision `live` was applied for.
    revision: Option<u64>,
    /// Routes Caddy refused, by service, with its reason.
    refusals: HashMap<String, (Value, String)>,
    /// Configuration writes sent during the current apply.
    writes: u32,
    /// Harbor's HTTPS parts (see [`tls::harbor_parts`]) as last written; `None` until known.
    tls_live: Option<Value>,
    /// HTTPS services Caddy refused, by service, with its reason.
    tls_refusals: HashMap<String, String>,
}

struct Read {
    status: u16,
    etag: Option<String>,
    body: Value,
    text: String,
}

/// What an apply starts from.
struct Plan {
    /// Harbor's inner routes as Caddy holds them.
    live: Value,
    offered: Vec<Value>,
    refused: Vec<RefusedService>,
    fallbacks_stale: bool,
}

/// A route Caddy refused, and its reason.
type Refused = (Value, String);

/// Caddy's verdict on a write.
enum Verdict {
    Taken,
    /// Someone else changed the configuration since it was read.
    Conflict,
    /// Caddy refused the configuration, for this reason.
    Refused(String),
}

impl Admin {
    pub fn new(settings: Settings) -> Self {
        Self {
            features: Features::of(&settings),
            settings,
            live: None,
            revision: None,
            refusals: HashMap::new(),
            writes: 0,
            tls_live: None,
            tls_refusals: HashMap::new(),
        }
    }

    fn inner_path(&self) -> String {
        format!("/id/{}/handle/0/routes", self.settings.route_id)
    }

    pub fn apply(&mut self, state: &DesiredState) -> Result<Applied, AdapterError> {
        self.writes = 0;
        let Plan {
            live,
            offered,
            mut refused,
            fallbacks_stale,
        } = self.plan(state)?;
        self.live = Some(live);
        let (accepted, newly) = self.write_isolating(offered)?;
        self.refusals
            .retain(|name, _| refused.iter().any(|r| &r.name == name));
        for (route, reason) in newly {
            let name = service_of(&route).unwrap_or_default().to_owned();
            log::log(
                Level::Warn,
                &format!("Caddy refuses the route of {name}: {reason}"),
            );
            refused.push(RefusedService {
                name: name.clone(),
                reason: reason.clone(),
            });
            self.refusals.insert(name, (route, reason));
        }
        self.live = Some(Value::Array(accepted));
        refused.extend(self.apply_tls(state)?);
        self.revision = Some(state.revision);
        Ok(Applied {
            revision: state.revision,
            refused,
            fallbacks_stale,
            writes: self.writes,
        })
    }

    /// Harbor's inner routes for `state`, as `apply` would write them (reading Caddy only to
    /// keep the fallback lists it holds), and its HTTPS parts, writing nothing.
    pub fn render(&self, state: &DesiredState) -> Result<Vec<Document>, AdapterError> {
        let plan = self.plan(state)?;
        let pretty = |v: &Value| {
            serde_json::to_string_pretty(v).map_err(|e| AdapterError::Rejected(e.to_string()))
        };
        let mut documents = vec![Document {
            target: self.inner_path(),
            content: pretty(&Value::Array(plan.offered))?,
        }];
        if !self.settings.tls_listen.is_empty() {
            let services = http_services(state);
            let offered: Vec<Service<'_>> = tls::https_services(&services)
                .into_iter()
                .filter(|s| !self.tls_refusals.contains_key(s.name))
                .collect();
            let kept = routes::fallbacks_of(&plan.live);
            let tls_plan = self.tls_plan(state, &offered, &kept);
            documents.push(Document {
                target: "/config/apps (Harbor's HTTPS parts)".into(),
                content: pretty(&tls::planned_parts(tls_plan.as_ref()))?,
            });
        }
        Ok(documents)
    }

    fn tls_plan(
        &self,
        state: &DesiredState,
        services: &[Service<'_>],
        kept: &Fallbacks,
    ) -> Option<TlsPlan> {
        let issuers = Issuers {
            acme_directory: state.tls.acme_directory.clone(),
            acme_email: state.tls.acme_email.clone(),
            acme_ca_root: state.tls.acme_ca_root.clone(),
            local_ca: state.tls.local_ca.clone(),
        };
        let plan = tls::plan(services, &issuers, &self.settings, self.features, kept);
        plan.container.is_some().then_some(plan)
    }

    /// Brings Harbor's HTTPS parts to `state`'s HTTPS services, in one write of Caddy's apps
    /// (one reload) when they changed. A write Caddy refuses is narrowed down to the services
    /// it refuses, one at a time (HTTPS services are few, and most refusals are a certificate
    /// file Caddy cannot load); those stay plain HTTP and are reported.
    fn apply_tls(&mut self, state: &DesiredState) -> Result<Vec<RefusedService>, AdapterError> {
        if self.settings.tls_listen.is_empty() {
            return Ok(Vec::new());
        }
        let services = http_services(state);
        let https = tls::https_services(&services);
        let kept = self
            .live
            .as_ref()
            .map(routes::fallbacks_of)
            .unwrap_or_default();
        let offered: Vec<Service<'_>> = https
            .iter()
            .filter(|s| !self.tls_refusals.contains_key(s.name))
            .cloned()
            .collect();
        self.tls_refusals
            .retain(|name, _| https.iter().any(|s| s.name == name));
        let plan = self.tls_plan(state, &offered, &kept);
        if let Err(reason) = self.write_tls(plan.as_ref())? {
            log::log(
                Level::Warn,
                &format!(
                    "Caddy refused Harbor's HTTPS configuration ({reason}); finding the services it refuses"
                ),
            );
            let mut accepted: Vec<Service<'_>> = Vec::new();
            for s in offered {
                let mut trial = accepted.clone();
                trial.push(s.clone());
                match self.write_tls(self.tls_plan(state, &trial, &kept).as_ref())? {
                    Ok(()) => accepted = trial,
                    Err(reason) => {
                        log::log(
                            Level::Warn,
                            &format!("Caddy refuses HTTPS for {}: {reason}", s.name),
                        );
                        self.tls_refusals.insert(s.name.to_owned(), reason);
                    }
                }
            }
            if let Err(reason) = self.write_tls(self.tls_plan(state, &accepted, &kept).as_ref())? {
                return Err(AdapterError::Rejected(format!(
                    "Caddy refuses Harbor's HTTPS configuration whatever services it holds: {reason}"
                )));
            }
        }
        Ok(self
            .tls_refusals
            .iter()
            .map(|(name, reason)| RefusedService {
                name: name.clone(),
                reason: format!("served over plain HTTP only: {reason}"),
            })
            .collect())
    }

    /// Makes Harbor's HTTPS parts in Caddy `plan`'s: `Ok(Err(reason))` when Caddy refuses.
    fn write_tls(&mut self, plan: Option<&TlsPlan>) -> Result<Result<(), String>, AdapterError> {
        let want = tls::planned_parts(plan);
        if self.tls_live.as_ref() == Some(&want) {
            return Ok(Ok(()));
        }
        let mut conflicts = 0;
        loop {
            let apps = get("/config/apps")?;
            if apps.status == 200 && tls::harbor_parts(&apps.body, &self.settings) == want {
                self.tls_live = Some(want);
                return Ok(Ok(()));
            }
            let mut merged = tls::merged_apps(&apps.body, plan);
            self.place_tls_routes(&mut merged, plan);
            self.writes += 1;
            let written = send("PATCH", "/config/apps", apps.etag.as_deref(), &merged)?;
            match verdict(&written)? {
                Verdict::Taken => {
                    self.tls_live = Some(want);
                    return Ok(Ok(()));
                }
                Verdict::Conflict if conflicts < MAX_CONFLICTS => conflicts += 1,
                Verdict::Conflict => {
                    return Err(AdapterError::Retryable(
                        "Caddy's configuration keeps changing under us".into(),
                    ));
                }
                Verdict::Refused(reason) => {
                    self.tls_live = None;
                    return Ok(Err(reason));
                }
            }
        }
    }

    /// Puts the HTTPS container first in the server listening on the HTTPS address (made if
    /// there is none), and the route of unredirected hosts first in the plain server; takes
    /// them out of every server where the plan has none. A server Harbor made for HTTPS goes
    /// once empty.
    fn place_tls_routes(&self, apps: &mut Value, plan: Option<&TlsPlan>) {
        let http_port = apps["http"]["http_port"].as_u64().unwrap_or(80);
        if !apps["http"]["servers"].is_object() {
            apps["http"]["servers"] = json!({});
        }
        let Some(servers) = apps["http"]["servers"].as_object_mut() else {
            return;
        };
        let ids = [
            tls::container_id(&self.settings),
            tls::unredirected_id(&self.settings),
        ];
        for server in servers.values_mut() {
            if let Some(routes) = server["routes"].as_array_mut() {
                routes.retain(|r| !ids.iter().any(|id| r["@id"] == id.as_str()));
            }
        }
        let unredirected = plan.and_then(|p| p.unredirected.clone());
        if let (Some(route), Some(name)) = (unredirected, self.pick_server(servers)) {
            let server = &mut servers[&name];
            // A host matcher in a server Caddy takes for an HTTPS one would make Caddy serve
            // HTTPS there: only a server on Caddy's HTTP port, or one without automatic
            // HTTPS, can hold it.
            let port_of = |a: &str| a.rsplit_once(':').and_then(|(_, p)| p.parse::<u64>().ok());
            let on_http_port = server["listen"].as_array().is_some_and(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .all(|a| port_of(a) == Some(http_port))
            });
            if on_http_port || server["automatic_https"]["disable"] == true {
                insert_first(server, route);
            } else {
                log::log(
                    Level::Warn,
                    &format!(
                        "Caddy's server {name:?} is not on its HTTP port ({http_port}): Caddy redirects every HTTPS host of Harbor's there, redirect_http = false or not"
                    ),
                );
            }
        }
        match plan.and_then(|p| p.container.clone()) {
            Some(container) => match server_on(servers, &self.settings.tls_listen) {
                Some(name) => insert_first(&mut servers[&name], container),
                None => {
                    servers.insert(
                        TLS_SERVER.into(),
                        json!({"listen": [self.settings.tls_listen], "routes": [container]}),
                    );
                }
            },
            None => {
                let ours_empty = servers
                    .get(TLS_SERVER)
                    .is_some_and(|s| s["routes"].as_array().is_none_or(Vec::is_empty));
                if ours_empty {
                    servers.remove(TLS_SERVER);
                }
            }
        }
    }

    /// The routes for `state`: those to offer Caddy, and those it refused before and would
    /// refuse again, which are not offered.
    fn plan(&self, state: &DesiredState) -> Result<Plan, AdapterError> {
        let services = http_services(state);
        let live = match &self.live {
            Some(live) => live.clone(),
            None => {
                is_caddy()?;
                get(&self.inner_path())?.body
            }
        };
        let kept = if state.refresh_fallbacks {
            Fallbacks::new()
        } else {
            routes::fallbacks_of(&live)
        };
        let desired = routes::routes(&services, &self.settings, self.features, &kept);
        let fallbacks_stale = routes::fallbacks_lag(&desired, &services);
        // A route Caddy refused is not offered again while it stays the same.
        let mut refused = Vec::new();
        let mut offered = Vec::with_capacity(desired.len());
        for route in desired {
            match service_of(&route).and_then(|name| self.refusals.get(name)) {
                Some((same, reason)) if *same == route => refused.push(RefusedService {
                    name: service_of(&route).unwrap_or_default().to_owned(),
                    reason: reason.clone(),
                }),
                _ => offered.push(route),
            }
        }
        Ok(Plan {
            live,
            offered,
            refused,
            fallbacks_stale,
        })
    }

    /// Writes `routes`; if Caddy refuses them, writes the largest part it takes, found by
    /// halving. Returns the routes Caddy holds and the refused ones with its reasons.
    fn write_isolating(
        &mut self,
        routes: Vec<Value>,
    ) -> Result<(Vec<Value>, Vec<Refused>), AdapterError> {
        // What was last written is still in place unless a probe found otherwise: instance
        // churn of dynamic services costs Caddy nothing, not even a read.
        if self.live.as_ref().and_then(Value::as_array) == Some(&routes) {
            return Ok((routes, Vec::new()));
        }
        let reason = match self.write(&routes)? {
            Ok(()) => return Ok((routes, Vec::new())),
            Err(reason) => reason,
        };
        log::log(
            Level::Warn,
            &format!("Caddy refused Harbor's routes ({reason}); finding the services it refuses"),
        );
        let mut accepted: Vec<usize> = Vec::new();
        let mut refused = Vec::new();
        let mut wrote = false;
        let mut groups: Vec<Vec<usize>> = Vec::new();
        match routes.len() {
            0 => {}
            1 => refused.push((routes[0].clone(), reason)),
            n => {
                let all: Vec<usize> = (0..n).collect();
                let (left, right) = all.split_at(n / 2);
                groups.push(right.to_vec());
                groups.push(left.to_vec());
            }
        }
        let pick = |indices: &[usize]| -> Vec<Value> {
            indices.iter().map(|&i| routes[i].clone()).collect()
        };
        while let Some(group) = groups.pop() {
            let mut trial: Vec<usize> = accepted.iter().chain(&group).copied().collect();
            trial.sort_unstable();
            match self.write(&pick(&trial))? {
                Ok(()) => {
                    accepted = trial;
                    wrote = true;
                }
                Err(reason) if group.len() == 1 => refused.push((routes[group[0]].clone(), reason)),
                Err(_) => {
                    let (left, right) = group.split_at(group.len() / 2);
                    groups.push(right.to_vec());
                    groups.push(left.to_vec());
                }
            }
        }
        let kept = pick(&accepted);
        // Caddy still holds what it held before this apply: bring it to the routes it takes.
        if !wrote && let Err(reason) = self.write(&kept)? {
            return Err(AdapterError::Rejected(format!(
                "Caddy refuses Harbor's routes whatever services they hold: {reason}"
            )));
        }
        Ok((kept, refused))
    }

    /// Makes Harbor's inner routes `routes`: `Ok(Err(reason))` when Caddy refuses them.
    fn write(&mut self, routes: &[Value]) -> Result<Result<(), String>, AdapterError> {
        let desired = Value::Array(routes.to_vec());
        let mut conflicts = 0;
        loop {
            let current = get(&self.inner_path())?;
            let written = if current.status != 200 {
                // The container route is gone (Caddy restarted from its Caddyfile) or was
                // never made: build it with the routes in it.
                self.create_container(&desired)?
            } else if current.body == desired {
                return Ok(Ok(()));
            } else {
                self.writes += 1;
                send(
                    "PATCH",
                    &self.inner_path(),
                    current.etag.as_deref(),
                    &desired,
                )?
            };
            match verdict(&written)? {
                Verdict::Taken => {
                    if current.status != 200 {
                        log::log(Level::Info, "created Harbor's container route in Caddy");
                    }
                    self.live = Some(desired);
                    return Ok(Ok(()));
                }
                Verdict::Conflict if conflicts < MAX_CONFLICTS => {
                    conflicts += 1;
                    log::log(
                        Level::Info,
                        "Harbor's routes changed under us; reading them again",
                    );
                }
                Verdict::Conflict => {
                    return Err(AdapterError::Retryable(
                        "Harbor's routes keep changing under us".into(),
                    ));
                }
                Verdict::Refused(reason) => return Ok(Err(reason)),
            }
        }
    }

    /// Inserts the container route, holding `inner`, first in the server that listens on the
    /// configured address (or the configured server), creating that server if none exists.
    /// Returns Caddy's answer to the write, for [`Admin::apply`] to judge like any other.
    fn create_container(&mut self, inner: &Value) -> Result<Read, AdapterError> {
        self.writes += 1;
        let container = routes::container(
            &self.settings.route_id,
            inner.as_array().cloned().unwrap_or_default(),
        );
        let servers = get("/config/apps/http/servers")?;
        let found = match &servers.body {
            Value::Object(map) => self.pick_server(map),
            _ => None,
        };
        let written = match found {
            Some(name) => {
                if name != "harbor" {
                    log::log(
                        Level::Warn,
                        &format!(
                            "Harbor's routes share Caddy's server {name:?} with other sites: a `caddy reload` from a Caddyfile drops them until Harbor puts them back (within a second), and meanwhile that server answers Harbor's hosts itself; a port of Harbor's own (--caddy-listen) avoids that"
                        ),
                    );
                }
                let routes_path = format!("/config/apps/http/servers/{name}/routes");
                let existing = get(&routes_path)?;
                if existing.status == 200 && existing.body.is_array() {
                    // Insert at index 0, conditional on the server's routes as just read.
                    send(
                        "PUT",
                        &format!("{routes_path}/0"),
                        existing.etag.as_deref(),
                        &container,
                    )?
                } else {
                    send("POST", &routes_path, None, &json!([container]))?
                }
            }
            None => {
                let server = json!({
                    "listen": [self.settings.listen],
                    "automatic_https": {"disable": true},
                    "routes": [container],
                });
                if servers.status == 200 && servers.body.is_object() {
                    send("POST", "/config/apps/http/servers/harbor", None, &server)?
                } else {
                    let apps = get("/config/apps")?;
                    if apps.status == 200 && apps.body.is_object() {
                        send(
                            "POST",
                            "/config/apps/http",
                            None,
                            &json!({"servers": {"harbor": server}}),
                        )?
                    } else {
                        send(
                            "POST",
                            "/config/apps",
                            None,
                            &json!({"http": {"servers": {"harbor": server}}}),
                        )?
                    }
                }
            }
        };
        Ok(written)
    }

    fn pick_server(&self, servers: &serde_json::Map<String, Value>) -> Option<String> {
        if !self.settings.server.is_empty() {
            return servers
                .contains_key(&self.settings.server)
                .then(|| self.settings.server.clone());
        }
        server_on(servers, &self.settings.listen)
    }

    pub fn probe(&mut self) -> Result<ProbeReport, AdapterError> {
        let current = get(&self.inner_path())?;
        let (Some(revision), Some(expected)) = (&self.revision, &self.live) else {
            return Ok(ProbeReport {
                in_sync: false,
                applied_revision: None,
                detail: "nothing applied yet".into(),
            });
        };
        let report = if current.status != 200 {
            ProbeReport {
                in_sync: false,
                applied_revision: None,
                detail: format!(
                    "Harbor's container route @id {:?} is gone from Caddy (restarted or reloaded?)",
                    self.settings.route_id
                ),
            }
        } else if &current.body != expected {
            ProbeReport {
                in_sync: false,
                applied_revision: None,
                detail: "Harbor's routes in Caddy were changed by someone else".into(),
            }
        } else if let Some(why) = self.tls_drift()? {
            ProbeReport {
                in_sync: false,
                applied_revision: None,
                detail: why,
            }
        } else {
            ProbeReport {
                in_sync: true,
                applied_revision: Some(*revision),
                detail: "Harbor's routes are in place".into(),
            }
        };
        if !report.in_sync {
            self.live = None;
            self.tls_live = None;
        }
        Ok(report)
    }

    /// What differs in Harbor's HTTPS parts from what was written, if anything.
    fn tls_drift(&self) -> Result<Option<String>, AdapterError> {
        let Some(written) = &self.tls_live else {
            return Ok(None);
        };
        let apps = get("/config/apps")?;
        Ok((tls::harbor_parts(&apps.body, &self.settings) != *written)
            .then(|| "Harbor's HTTPS configuration in Caddy is gone or was changed".to_owned()))
    }

    pub fn release(&mut self) -> Result<(), AdapterError> {
        self.tls_live = None;
        if let Err(reason) = self.write_tls(None)? {
            return Err(AdapterError::Rejected(format!(
                "Caddy refuses the removal of Harbor's HTTPS configuration: {reason}"
            )));
        }
        self.tls_live = None;
        let path = format!("/id/{}", self.settings.route_id);
        let current = get(&path)?;
        if current.status == 200 {
            let deleted = send("DELETE", &path, current.etag.as_deref(), &Value::Null)?;
            if deleted.status != 200 && deleted.status != 404 {
                return Err(refusal(deleted.status, &deleted.text));
            }
        }
        // A server Harbor created is removed too once nothing else is in it.
        let ours = get("/config/apps/http/servers/harbor")?;
        let empty = ours.body["routes"].as_array().is_none_or(|r| r.is_empty());
        if ours.status == 200 && ours.body.is_object() && empty {
            send(
                "DELETE",
                "/config/apps/http/servers/harbor",
                ours.etag.as_deref(),
                &Value::Null,
            )?;
        }
        self.live = None;
        self.revision = None;
        Ok(())
    }
}

/// The name of the HTTPS server Harbor creates when Caddy has none on the HTTPS address.
const TLS_SERVER: &str = "harbor-tls";

/// Puts `route` first among `server`'s routes.
fn insert_first(server: &mut Value, route: Value) {
    match server["routes"].as_array_mut() {
        Some(routes) => routes.insert(0, route),
        None => server["routes"] = json!([route]),
    }
}

/// The server listening on `addr`'s port.
fn server_on(servers: &serde_json::Map<String, Value>, addr: &str) -> Option<String> {
    let port = addr.rsplit_once(':').map(|(_, p)| p)?;
    servers
        .iter()
        .find(|(_, s)| {
            s["listen"].as_array().is_some_and(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .any(|a| a.rsplit_once(':').map(|(_, p)| p) == Some(port))
            })
        })
        .map(|(name, _)| name.clone())
}

/// What Caddy's answer to a write says. Caddy answers a configuration it cannot load with `400`
/// or, for errors found while loading, `500` with a JSON `error`; other answers mean it could
/// not be asked (a proxy in front of it, a restart) and are worth retrying.
fn verdict(written: &Read) -> Result<Verdict, AdapterError> {
    let caddy_error = written.body["error"].as_str();
    match written.status {
        200 => Ok(Verdict::Taken),
        412 => Ok(Verdict::Conflict),
        400..=499 => Ok(Verdict::Refused(reason(written))),
        500 if caddy_error.is_some() => Ok(Verdict::Refused(reason(written))),
        status => Err(AdapterError::Retryable(format!(
            "Caddy answered {status}: {}",
            written.text.trim()
        ))),
    }
}

/// Caddy's reason, from its JSON error when it gave one.
fn reason(written: &Read) -> String {
    match written.body["error"].as_str() {
        Some(error) => format!("Caddy answered {}: {error}", written.status),
        None => format!("Caddy answered {}: {}", written.status, written.text.trim()),
    }
}

fn refusal(status: u16, text: &str) -> AdapterError {
    let message = format!("Caddy answered {status}: {}", text.trim());
    if (400..500).contains(&status) {
        AdapterError::Rejected(message)
    } else {
        AdapterError::Retryable(message)
    }
}

/// Checks that the admin address answers as Caddy's admin API does: `GET /config/` gives JSON
/// (`null` for an empty configuration). Anything else there is a configuration mistake that
/// retrying will not mend.
fn is_caddy() -> Result<(), AdapterError> {
    let r = http_client::send("GET", "/config/", &[], &[]).map_err(unavailable)?;
    let json = header(&r, "content-type").is_some_and(|t| t.starts_with("application/json"));
    let parsed = serde_json::from_slice::<Value>(&r.body).is_ok();
    if r.status == 200 && json && parsed {
        return Ok(());
    }
    Err(AdapterError::Rejected(format!(
        "the admin address does not answer as Caddy's admin API: GET /config/ gave {} ({})",
        r.status,
        header(&r, "content-type").unwrap_or("no content type")
    )))
}

fn unavailable(e: HttpError) -> AdapterError {
    AdapterError::Retryable(match e {
        HttpError::Forbidden(m) => format!("the host refused the request: {m}"),
        HttpError::Unreachable(m) => format!("Caddy's admin API is unreachable: {m}"),
        HttpError::Timeout => "Caddy's admin API did not answer in time".into(),
    })
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn get(path: &str) -> Result<Read, AdapterError> {
    let r = http_client::send("GET", path, &[], &[]).map_err(unavailable)?;
    Ok(read(r))
}

fn send(
    method: &str,
    path: &str,
    if_match: Option<&str>,
    body: &Value,
) -> Result<Read, AdapterError> {
    let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    if let Some(etag) = if_match {
        headers.push(("if-match".to_owned(), etag.to_owned()));
    }
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(body).map_err(|e| AdapterError::Rejected(e.to_string()))?
    };
    let r = http_client::send(method, path, &headers, &bytes).map_err(unavailable)?;
    Ok(read(r))
}

fn read(r: Response) -> Read {
    let etag = header(&r, "etag").map(str::to_owned);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let body = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    Read {
        status: r.status,
        etag,
        body,
        text,
    }
}
