//! Writing the xDS files and reading Envoy's verdict. Only files whose resources changed are
//! replaced, so an instance coming or going rewrites one EDS file and nothing else: Envoy
//! updates the endpoints without touching listeners, routes or clusters.
//!
//! Filesystem xDS has no ACK/NACK: Envoy's verdict on a file is a counter that moves after the
//! write (`update_success` or `update_rejected` of its resource type). After writing listeners,
//! clusters or routes, an apply watches those counters until they move. When Envoy refuses an
//! update, the adapter finds the services it refuses by halving the services it writes, as the
//! Caddy adapter does, and applies the rest. `probe` reads the same counters and the route
//! configuration's live version, and looks for every listener and cluster Harbor wrote among
//! those Envoy runs: a tcp service is a listener and a cluster, and no route.
//!
//! Envoy judges a file when it reads it, at its start too: a listener on a port something else
//! holds by then is refused with no write of Harbor's there to see it. Such a listener (or
//! cluster) is offered again by the next apply, as if its file had changed, so that Envoy's
//! verdict on it is seen and the service it belongs to is found and reported.

use std::collections::BTreeMap;

use serde_json::Value;

use harbor_adapter_common::bindings::exports::harbor::backend::adapter::{
    AdapterError, DesiredState, Document, ProbeReport,
};
use harbor_adapter_common::bindings::harbor::backend::log::{self, Level};
use harbor_adapter_common::bindings::harbor::backend::types::{Applied, RefusedService};
use harbor_adapter_common::bindings::harbor::backend::{files, http_client, timer};
use harbor_adapter_common::{Service, http_services, tcp_services};

use crate::live::{self, Gap, Standing};
use crate::xds::{self, Settings};

pub struct Files {
    settings: Settings,
    /// Each file's resources as last written (without the version), and that version.
    written: BTreeMap<String, (Value, u64)>,
    /// The `update_rejected` counters before the last write, when Envoy could be asked.
    rejected_before: Option<BTreeMap<String, u64>>,
    /// The version of `rds.json` last written.
    rds_version: Option<u64>,
    revision: u64,
    /// Services Envoy refused: how each looked, and Envoy's reason.
    refusals: BTreeMap<String, (String, String)>,
    /// Files written during the current apply.
    writes: u32,
    /// Whether the admin address was seen to answer as Envoy's; asked again after any failure.
    is_envoy: bool,
}

/// Longest an apply waits for Envoy to take or refuse what it wrote, and how often it looks.
const VERDICT_WITHIN_MS: u32 = 3_000;
const VERDICT_EVERY_MS: u32 = 10;

/// Envoy's verdict on a write.
enum Verdict {
    Taken,
    Refused(String),
}

impl Files {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            written: BTreeMap::new(),
            rejected_before: None,
            rds_version: None,
            revision: 0,
            refusals: BTreeMap::new(),
            writes: 0,
            is_envoy: false,
        }
    }

    /// Checks, once while it keeps answering, that the admin address is Envoy's: anything else
    /// there is a configuration mistake that retrying will not mend, and Harbor's files would
    /// be written for nobody.
    fn check_envoy(&mut self) -> Result<(), AdapterError> {
        if self.is_envoy {
            return Ok(());
        }
        let info = admin_get("/server_info")?;
        let info: Value = serde_json::from_str(&info).unwrap_or(Value::Null);
        if info["version"].is_string() && info["state"].is_string() {
            self.is_envoy = true;
            return Ok(());
        }
        Err(AdapterError::Rejected(
            "the admin address does not answer as Envoy's admin API: GET /server_info gave no Envoy version and state".into(),
        ))
    }

    pub fn apply(&mut self, state: &DesiredState) -> Result<Applied, AdapterError> {
        self.writes = 0;
        // Envoy may not be up yet, and its files are written all the same: it reads them when
        // it starts. Only an admin address that answers as something else is refused.
        // Asked afresh each time: an Envoy known to be Envoy may have gone down since.
        let down = match self.check_envoy().and_then(|()| admin_get("/server_info")) {
            Err(AdapterError::Rejected(why)) => return Err(AdapterError::Rejected(why)),
            Err(AdapterError::Retryable(why)) => Some(why),
            Ok(_) => None,
        };
        let (http, tcp) = (http_services(state), tcp_services(state));
        let all: Vec<&Service<'_>> = http.iter().chain(tcp.iter()).collect();
        let (offered, mut refused) = self.offer(all);
        let mut newly = Vec::new();
        if let Verdict::Refused(reason) = self.write(state.revision, &offered)? {
            log::log(
                Level::Warn,
                &format!("{reason}; finding the services it refuses"),
            );
            newly = self.isolate(state.revision, &offered, reason)?;
        }
        self.refusals
            .retain(|name, _| refused.iter().any(|r| &r.name == name));
        for (s, reason) in newly {
            log::log(Level::Warn, &format!("Envoy refuses {}: {reason}", s.name));
            refused.push(RefusedService {
                name: s.name.to_owned(),
                reason: reason.clone(),
            });
            self.refusals.insert(s.name.to_owned(), (looks(s), reason));
        }
        self.revision = state.revision;
        if let Some(why) = down {
            // Written, but not live: Harbor keeps the state out of step and tries again, and
            // the try after Envoy answers finds the files in place and confirms them.
            return Err(AdapterError::Retryable(format!(
                "the files are written, but Envoy is not serving them yet: {why}"
            )));
        }
        Ok(Applied {
            revision: state.revision,
            refused,
            // Envoy's files hold every instance: there is no fallback to refresh.
            fallbacks_stale: false,
            writes: self.writes,
        })
    }

    /// The files `apply` would write for `state`, as they would stand after it, writing
    /// nothing. A file whose resources are unchanged keeps the version it was written with.
    pub fn render(&self, state: &DesiredState) -> Result<Vec<Document>, AdapterError> {
        let (http, tcp) = (http_services(state), tcp_services(state));
        let (offered, _) = self.offer(http.iter().chain(tcp.iter()).collect());
        self.plan(&offered)
            .into_iter()
            .map(|(name, resources)| {
                let version = match self.written.get(&name) {
                    Some((written, version)) if *written == resources => *version,
                    _ => state.revision,
                };
                let doc =
                    xds::discovery(version, resources.as_array().cloned().unwrap_or_default());
                let content = serde_json::to_string_pretty(&doc)
                    .map_err(|e| AdapterError::Rejected(e.to_string()))?;
                Ok(Document {
                    target: name,
                    content,
                })
            })
            .collect()
    }

    /// The services to offer Envoy, and those it refused before and would refuse again, which
    /// are not offered.
    fn offer<'s, 'a>(
        &self,
        all: Vec<&'s Service<'a>>,
    ) -> (Vec<&'s Service<'a>>, Vec<RefusedService>) {
        let mut refused = Vec::new();
        let mut offered = Vec::with_capacity(all.len());
        for s in all {
            match self.refusals.get(s.name) {
                Some((looked, reason)) if *looked == looks(s) => refused.push(RefusedService {
                    name: s.name.to_owned(),
                    reason: reason.clone(),
                }),
                _ => offered.push(s),
            }
        }
        (offered, refused)
    }

    /// Every file for `services`, with its resources, in the order they are written: endpoints
    /// first and listeners last, so that a new cluster finds its EDS file, a new route finds
    /// its cluster, and a new listener finds its routes.
    fn plan(&self, services: &[&Service<'_>]) -> Vec<(String, Value)> {
        let http: Vec<Service<'_>> = services
            .iter()
            .filter(|s| s.listen.is_none())
            .map(|s| (*s).clone())
            .collect();
        let tcp: Vec<&Service<'_>> = services
            .iter()
            .copied()
            .filter(|s| s.listen.is_some())
            .collect();
        let eds = |i: usize| i < self.settings.eds_max && !xds::names_upstreams(services[i]);
        let mut plan: Vec<(String, Value)> = Vec::new();
        for (i, s) in services.iter().enumerate() {
            if eds(i) {
                plan.push((xds::eds_file(s.name), Value::Array(vec![xds::endpoints(s)])));
            }
        }
        plan.push((
            "cds.json".into(),
            Value::Array(
                services
                    .iter()
                    .enumerate()
                    .map(|(i, s)| xds::cluster(s, &self.settings, eds(i)))
                    .collect(),
            ),
        ));
        plan.push((
            "rds.json".into(),
            Value::Array(vec![xds::route_config(&http)]),
        ));
        let mut listeners = vec![xds::http_listener(&self.settings)];
        listeners.extend(tcp.iter().map(|s| xds::tcp_listener(s)));
        plan.push(("lds.json".into(), Value::Array(listeners)));
        plan
    }

    /// Writes the largest part of `services` (which Envoy refused whole, for `reason`) that it
    /// takes, found by halving; returns the services it refuses, with its reasons.
    fn isolate<'s, 'a>(
        &mut self,
        revision: u64,
        services: &[&'s Service<'a>],
        reason: String,
    ) -> Result<Vec<(&'s Service<'a>, String)>, AdapterError> {
        let mut accepted: Vec<usize> = Vec::new();
        let mut refused = Vec::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        match services.len() {
            0 => {}
            1 => refused.push((services[0], reason)),
            n => {
                let all: Vec<usize> = (0..n).collect();
                let (left, right) = all.split_at(n / 2);
                groups.push(right.to_vec());
                groups.push(left.to_vec());
            }
        }
        let pick = |indices: &[usize]| -> Vec<&'s Service<'a>> {
            indices.iter().map(|&i| services[i]).collect()
        };
        while let Some(group) = groups.pop() {
            let mut trial: Vec<usize> = accepted.iter().chain(&group).copied().collect();
            trial.sort_unstable();
            match self.write(revision, &pick(&trial))? {
                Verdict::Taken => accepted = trial,
                Verdict::Refused(reason) if group.len() == 1 => {
                    refused.push((services[group[0]], reason));
                }
                Verdict::Refused(_) => {
                    let (left, right) = group.split_at(group.len() / 2);
                    groups.push(right.to_vec());
                    groups.push(left.to_vec());
                }
            }
        }
        // Envoy holds what it took last; bring every file to the services it takes.
        if let Verdict::Refused(reason) = self.write(revision, &pick(&accepted))? {
            return Err(AdapterError::Rejected(format!(
                "Envoy refuses Harbor's configuration whatever services it holds: {reason}"
            )));
        }
        Ok(refused)
    }

    /// Writes the files for `services` that changed and waits for Envoy's verdict on them.
    fn write(&mut self, revision: u64, services: &[&Service<'_>]) -> Result<Verdict, AdapterError> {
        let plan = self.plan(services);
        let again = self.to_offer_again(&plan);
        let changed: Vec<&(String, Value)> = plan
            .iter()
            .filter(|(name, resources)| {
                again.contains(name) || self.written.get(name).is_none_or(|(w, _)| w != resources)
            })
            .collect();
        // Envoy may not be up yet: then there is no verdict to wait for, and `probe` tells.
        let before = if changed.is_empty() {
            None
        } else {
            counters().ok()
        };
        if before.is_some() {
            self.rejected_before = before.as_ref().map(rejected_only);
        }
        let mut judged = Vec::new();
        for (name, resources) in changed {
            let doc = xds::discovery(revision, resources.as_array().cloned().unwrap_or_default());
            let bytes = serde_json::to_vec_pretty(&doc)
                .map_err(|e| AdapterError::Rejected(e.to_string()))?;
            files::write(name, &bytes)
                .map_err(|e| AdapterError::Retryable(format!("cannot write {name}: {e}")))?;
            self.writes += 1;
            if name == "rds.json" {
                self.rds_version = Some(revision);
            }
            self.written
                .insert(name.clone(), (resources.clone(), revision));
            if let Some(kind) = Kind::of_file(name) {
                judged.push(kind);
            }
        }
        // EDS files of services that are gone, once no cluster names them.
        let keep: Vec<String> = services
            .iter()
            .take(self.settings.eds_max)
            .map(|s| xds::eds_file(s.name))
            .collect();
        let existing = files::list().map_err(AdapterError::Retryable)?;
        for name in existing {
            if name.starts_with("eds-") && name.ends_with(".json") && !keep.contains(&name) {
                files::remove(&name).map_err(AdapterError::Retryable)?;
                self.written.remove(&name);
            }
        }
        let verdict = match before {
            Some(before) if !judged.is_empty() => verdict(&before, &judged)?,
            _ => Verdict::Taken,
        };
        if let Verdict::Refused(_) = verdict {
            // Envoy kept what it had: these files are not in force, whatever they hold.
            for kind in judged {
                self.written.remove(kind.file());
            }
        }
        Ok(verdict)
    }

    /// The files of `plan` that are unchanged since written but hold a listener or cluster
    /// Envoy does not have at all (it refused it when it read the file, or lost it): written
    /// again, they get a verdict. Only while Envoy answers and reads that kind of file (its
    /// counters tell), so that an Envoy that never reads them is not written to in a loop.
    fn to_offer_again(&self, plan: &[(String, Value)]) -> Vec<String> {
        let unchanged = |file: &str| {
            plan.iter().any(|(name, resources)| {
                name == file && self.written.get(name).is_some_and(|(w, _)| w == resources)
            })
        };
        let files: Vec<&str> = ["lds.json", "cds.json"]
            .into_iter()
            .filter(|f| unchanged(f))
            .collect();
        if files.is_empty() {
            return Vec::new();
        }
        let Ok(gaps) = self.gaps(&files) else {
            return Vec::new();
        };
        let missing: Vec<Gap> = gaps
            .into_iter()
            .filter(|g| matches!(g.standing, Standing::Missing(_)))
            .collect();
        if missing.is_empty() {
            return Vec::new();
        }
        let Ok(counters) = counters() else {
            return Vec::new();
        };
        files
            .into_iter()
            .filter(|file| {
                let kind = Kind::of_file(file).expect("lds.json or cds.json");
                missing.iter().any(|g| Kind::of_gap(g) == kind)
                    && counters.keys().any(|name| kind.counts(name))
            })
            .inspect(|file| {
                let why = live::summary(&missing);
                log::log(Level::Info, &format!("{why}; offering {file} again"));
            })
            .map(str::to_owned)
            .collect()
    }

    /// The listeners and clusters in `files` (of `lds.json` and `cds.json`), as last written,
    /// that Envoy does not run.
    fn gaps(&self, files: &[&str]) -> Result<Vec<Gap>, AdapterError> {
        let written = |file: &str| {
            self.written
                .get(file)
                .map(|(resources, _)| live::names(resources))
                .unwrap_or_default()
        };
        let dump = |resource: &str| -> Result<Value, AdapterError> {
            let text = admin_get(&format!("/config_dump?resource={resource}"))?;
            Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
        };
        let mut gaps = Vec::new();
        if files.contains(&"lds.json") {
            let names = written("lds.json");
            if !names.is_empty() {
                gaps.extend(live::listener_gaps(&names, &dump("dynamic_listeners")?));
            }
        }
        if files.contains(&"cds.json") {
            let names = written("cds.json");
            if !names.is_empty() {
                let active = live::clusters(&dump("dynamic_active_clusters")?);
                let missing = names.iter().any(|n| !active.contains(n));
                let warming = if missing {
                    live::clusters(&dump("dynamic_warming_clusters")?)
                } else {
                    Default::default()
                };
                gaps.extend(live::cluster_gaps(&names, &active, &warming));
            }
        }
        Ok(gaps)
    }

    pub fn probe(&mut self) -> Result<ProbeReport, AdapterError> {
        // Envoy is asked first, so that a probe of an Envoy that is down fails.
        self.check_envoy()?;
        let rejected = match counters() {
            Ok(counters) => rejected_only(&counters),
            Err(e) => {
                // Whatever answers when it is back is checked again.
                self.is_envoy = false;
                return Err(e);
            }
        };
        let Some(rds_version) = self.rds_version else {
            return Ok(ProbeReport {
                in_sync: false,
                applied_revision: None,
                detail: "nothing applied yet".into(),
            });
        };
        if let Some(before) = &self.rejected_before {
            let grew: Vec<String> = rejected
                .iter()
                .filter(|(name, n)| **n > before.get(*name).copied().unwrap_or(0))
                .map(|(name, _)| name.clone())
                .collect();
            if !grew.is_empty() {
                return Err(AdapterError::Rejected(format!(
                    "Envoy rejected the update of revision {} ({}); it keeps its previous configuration",
                    self.revision,
                    grew.join(", ")
                )));
            }
        }
        let routes = live_route_version()?;
        let detail = match routes {
            Some(v) if v == rds_version => None,
            Some(v) => Some(format!(
                "Envoy runs routes version {v}, Harbor wrote {rds_version}"
            )),
            None => Some("Envoy has not loaded Harbor's routes".into()),
        };
        // The whole desired state: the routes, and every listener and cluster with them.
        let detail = match detail {
            Some(detail) => Some(detail),
            None => {
                let gaps = self.gaps(&["lds.json", "cds.json"])?;
                (!gaps.is_empty()).then(|| live::summary(&gaps))
            }
        };
        let in_sync = detail.is_none();
        Ok(ProbeReport {
            in_sync,
            applied_revision: if in_sync { Some(self.revision) } else { None },
            detail: detail.unwrap_or_else(|| {
                let count = |file: &str| {
                    self.written
                        .get(file)
                        .map_or(0, |(resources, _)| live::names(resources).len())
                };
                format!(
                    "Envoy runs routes version {rds_version}, and Harbor's {} listeners and {} clusters",
                    count("lds.json"),
                    count("cds.json")
                )
            }),
        })
    }

    pub fn release(&mut self) -> Result<(), AdapterError> {
        // Empty resource lists: Envoy drops Harbor's listeners and clusters. The bootstrap
        // names these two files, so they stay, empty.
        let before = counters().ok();
        for name in ["lds.json", "cds.json"] {
            let doc = xds::discovery(self.revision + 1, Vec::new());
            let bytes = serde_json::to_vec_pretty(&doc)
                .map_err(|e| AdapterError::Rejected(e.to_string()))?;
            files::write(name, &bytes).map_err(AdapterError::Retryable)?;
        }
        // Once no listener refers to the routes and no cluster to its endpoints, their files
        // go too.
        if let Some(before) = before {
            verdict(&before, &[Kind::Listeners, Kind::Clusters])?;
        }
        for name in files::list().map_err(AdapterError::Retryable)? {
            let ours = name == "rds.json" || (name.starts_with("eds-") && name.ends_with(".json"));
            if ours {
                files::remove(&name).map_err(AdapterError::Retryable)?;
            }
        }
        self.written.clear();
        self.rds_version = None;
        Ok(())
    }
}

fn admin_get(path: &str) -> Result<String, AdapterError> {
    let r = http_client::send("GET", path, &[], &[]).map_err(|e| {
        AdapterError::Retryable(match e {
            http_client::HttpError::Forbidden(m) => format!("the host refused the request: {m}"),
            http_client::HttpError::Unreachable(m) => {
                format!("Envoy's admin API is unreachable: {m}")
            }
            http_client::HttpError::Timeout => "Envoy's admin API did not answer in time".into(),
        })
    })?;
    if r.status != 200 {
        return Err(AdapterError::Retryable(format!(
            "Envoy's admin answered {} for {path}",
            r.status
        )));
    }
    Ok(String::from_utf8_lossy(&r.body).into_owned())
}

/// Every `*.update_success` and `*.update_rejected` counter Envoy has, by name.
fn counters() -> Result<BTreeMap<String, u64>, AdapterError> {
    // A plain filter: a regular expression's characters are not all valid in a URL.
    let text = admin_get("/stats?filter=update_")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            let name = name.trim();
            let judged = name.ends_with(".update_success") || name.ends_with(".update_rejected");
            judged.then(|| Some((name.to_owned(), value.trim().parse().ok()?)))?
        })
        .collect())
}

fn rejected_only(counters: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    counters
        .iter()
        .filter(|(name, _)| name.ends_with(".update_rejected"))
        .map(|(name, n)| (name.clone(), *n))
        .collect()
}

/// A resource type whose file Envoy judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Listeners,
    Clusters,
    Routes,
}

impl Kind {
    fn file(self) -> &'static str {
        match self {
            Kind::Listeners => "lds.json",
            Kind::Clusters => "cds.json",
            Kind::Routes => "rds.json",
        }
    }

    /// The kind whose file holds what `gap` names.
    fn of_gap(gap: &Gap) -> Self {
        if gap.what == "listener" {
            Kind::Listeners
        } else {
            Kind::Clusters
        }
    }

    fn of_file(name: &str) -> Option<Self> {
        match name {
            "lds.json" => Some(Kind::Listeners),
            "cds.json" => Some(Kind::Clusters),
            "rds.json" => Some(Kind::Routes),
            _ => None,
        }
    }

    /// Whether `counter` counts this type's updates.
    fn counts(self, counter: &str) -> bool {
        match self {
            Kind::Listeners => counter.starts_with("listener_manager.lds."),
            Kind::Clusters => counter.starts_with("cluster_manager.cds."),
            Kind::Routes => counter.contains(&format!(".rds.{}.", xds::ROUTE_CONFIG)),
        }
    }
}

/// Watches Envoy's counters for `kinds` until each has moved from `before`; refused as soon as
/// a rejection counter moves. A verdict that does not come in time counts as taken: `probe`
/// keeps watching.
fn verdict(before: &BTreeMap<String, u64>, kinds: &[Kind]) -> Result<Verdict, AdapterError> {
    let mut waited = 0;
    loop {
        let now = counters()?;
        let moved = |name: &String, n: &u64| *n > before.get(name).copied().unwrap_or(0);
        let rejected: Vec<&String> = now
            .iter()
            .filter(|(name, n)| name.ends_with(".update_rejected") && moved(name, n))
            .map(|(name, _)| name)
            .collect();
        if !rejected.is_empty() {
            let counters = rejected
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Ok(Verdict::Refused(match listener_errors() {
                Some(details) => format!("Envoy rejected the update: {details} ({counters})"),
                None => format!("Envoy rejected the update ({counters})"),
            }));
        }
        let all_taken = kinds.iter().all(|kind| {
            now.iter().any(|(name, n)| {
                kind.counts(name) && name.ends_with(".update_success") && moved(name, n)
            })
        });
        if all_taken || waited >= VERDICT_WITHIN_MS {
            return Ok(Verdict::Taken);
        }
        timer::pause(VERDICT_EVERY_MS);
        waited += VERDICT_EVERY_MS;
    }
}

/// Why Envoy refused listeners, as its configuration dump tells (`error_state`), if it does.
fn listener_errors() -> Option<String> {
    let text = admin_get("/config_dump?resource=dynamic_listeners").ok()?;
    let dump: Value = serde_json::from_str(&text).ok()?;
    let mut details: Vec<String> = dump["configs"]
        .as_array()?
        .iter()
        .filter_map(|l| l["error_state"]["details"].as_str())
        .map(str::to_owned)
        .collect();
    details.sort_unstable();
    details.dedup();
    (!details.is_empty()).then(|| details.join("; "))
}

/// What a service looked like when Envoy judged it.
fn looks(s: &Service<'_>) -> String {
    format!("{s:?}")
}

/// The version of Harbor's route configuration Envoy runs.
fn live_route_version() -> Result<Option<u64>, AdapterError> {
    let text = admin_get("/config_dump?resource=dynamic_route_configs")?;
    let dump: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let configs = dump["configs"].as_array().cloned().unwrap_or_default();
    Ok(configs
        .iter()
        .find(|c| c["route_config"]["name"] == xds::ROUTE_CONFIG)
        .and_then(|c| c["version_info"].as_str())
        .and_then(|v| v.parse().ok()))
}
