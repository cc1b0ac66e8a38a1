//! Writing the xDS files and reading Envoy's verdict. Only files whose resources changed are
//! replaced, so an instance coming or going rewrites one EDS file and nothing else: Envoy
//! updates the endpoints without touching listeners, routes or clusters. A certificate's
//! renewal, likewise, rewrites its SDS file alone.
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
use harbor_adapter_common::{Service, certificates, http_services, tcp_services};

use crate::live::{self, Gap, Standing};
use crate::tls::{self, Served};
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
        let certs = certificates(state);
        let served = Served::new(&self.settings, &certs);
        let all: Vec<&Service<'_>> = http.iter().chain(tcp.iter()).collect();
        let (offered, mut refused) = self.offer(all, &served);
        let mut newly = Vec::new();
        if let Verdict::Refused(reason) = self.write(state.revision, &offered, &served)? {
            log::log(
                Level::Warn,
                &format!("{reason}; finding the services it refuses"),
            );
            newly = self.isolate(state.revision, &offered, &served, reason)?;
        }
        self.refusals
            .retain(|name, _| refused.iter().any(|r| &r.name == name));
        for (s, reason) in newly {
            log::log(Level::Warn, &format!("Envoy refuses {}: {reason}", s.name));
            refused.push(RefusedService {
                name: s.name.to_owned(),
                reason: reason.clone(),
            });
            self.refusals
                .insert(s.name.to_owned(), (looks(s, &served), reason));
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
    /// Private keys are left out: what `render` gives is shown to the API's users.
    pub fn render(&self, state: &DesiredState) -> Result<Vec<Document>, AdapterError> {
        let (http, tcp) = (http_services(state), tcp_services(state));
        let certs = certificates(state);
        let served = Served::new(&self.settings, &certs);
        let (offered, _) = self.offer(http.iter().chain(tcp.iter()).collect(), &served);
        self.plan(&offered, &served)
            .into_iter()
            .map(|(name, resources)| {
                let version = match self.written.get(&name) {
                    Some((written, version)) if *written == resources => *version,
                    _ => state.revision,
                };
                let mut doc =
                    xds::discovery(version, resources.as_array().cloned().unwrap_or_default());
                tls::hide_keys(&mut doc);
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
    /// are not offered. A tcp service terminating TLS with no certificate yet is refused too,
    /// and not remembered: it is offered once the host gives one of its certificates.
    fn offer<'s, 'a>(
        &self,
        all: Vec<&'s Service<'a>>,
        served: &Served<'a>,
    ) -> (Vec<&'s Service<'a>>, Vec<RefusedService>) {
        let mut refused = Vec::new();
        let mut offered = Vec::with_capacity(all.len());
        for s in all {
            if let Some(reason) = served.waiting(s) {
                refused.push(RefusedService {
                    name: s.name.to_owned(),
                    reason,
                });
                continue;
            }
            match self.refusals.get(s.name) {
                Some((looked, reason)) if *looked == looks(s, served) => {
                    refused.push(RefusedService {
                        name: s.name.to_owned(),
                        reason: reason.clone(),
                    })
                }
                _ => offered.push(s),
            }
        }
        (offered, refused)
    }

    /// Every file for `services`, with its resources, in the order they are written: secrets
    /// and endpoints first and listeners last, so that a new cluster finds its EDS file, a new
    /// route finds its cluster, and a new listener finds its secrets and routes.
    fn plan(&self, services: &[&Service<'_>], served: &Served<'_>) -> Vec<(String, Value)> {
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
        let mut https: Vec<&str> = http.iter().flat_map(|s| served.https_hosts(s)).collect();
        https.sort_unstable();
        https.dedup();
        let mut secrets: Vec<&str> = services.iter().flat_map(|s| served.hosts(s)).collect();
        secrets.sort_unstable();
        secrets.dedup();
        let mut plan: Vec<(String, Value)> = secrets
            .into_iter()
            .filter_map(|host| served.certificate(host))
            .map(|c| (tls::secret_file(c.host), Value::Array(vec![tls::secret(c)])))
            .collect();
        let eds = |i: usize| i < self.settings.eds_max && !xds::names_upstreams(services[i]);
        for (i, s) in services.iter().enumerate() {
            if eds(i) {
                plan.push((xds::eds_file(s.name), Value::Array(vec![xds::endpoints(s)])));
            }
        }
        let mut clusters: Vec<Value> = services
            .iter()
            .enumerate()
            .map(|(i, s)| xds::cluster(s, &self.settings, eds(i)))
            .collect();
        if xds::answers_acme(&self.settings, &http) {
            clusters.push(xds::acme_cluster(&self.settings));
        }
        plan.push(("cds.json".into(), Value::Array(clusters)));
        let routes = xds::route_config(&http, served);
        plan.push((
            xds::RDS_FILE.into(),
            Value::Array(vec![xds::with_challenges(routes, &self.settings, &http)]),
        ));
        let mut listeners = vec![xds::http_listener(&self.settings)];
        // Only with a listener that asks for them: Envoy reads a route file no listener names
        // at no time, and an apply would wait for its verdict in vain.
        if !https.is_empty() {
            plan.push((
                xds::TLS_RDS_FILE.into(),
                Value::Array(vec![xds::tls_route_config(&http, served)]),
            ));
            listeners.push(tls::https_listener(&self.settings, &https));
        }
        listeners.extend(
            tcp.iter()
                .filter(|s| !matches!(s.tls, xds::Tls::Passthrough(_)))
                .map(|s| xds::tcp_listener(&self.settings, s, &served.terminated(s))),
        );
        listeners.extend(tls::sni_listeners(&tcp));
        plan.push(("lds.json".into(), Value::Array(listeners)));
        plan
    }

    /// Writes the largest part of `services` (which Envoy refused whole, for `reason`) that it
    /// takes, found by halving; returns the services it refuses, with its reasons.
    fn isolate<'s, 'a>(
        &mut self,
        revision: u64,
        services: &[&'s Service<'a>],
        served: &Served<'a>,
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
            match self.write(revision, &pick(&trial), served)? {
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
        if let Verdict::Refused(reason) = self.write(revision, &pick(&accepted), served)? {
            return Err(AdapterError::Rejected(format!(
                "Envoy refuses Harbor's configuration whatever services it holds: {reason}"
            )));
        }
        Ok(refused)
    }

    /// Writes the files for `services` that changed and waits for Envoy's verdict on them.
    fn write(
        &mut self,
        revision: u64,
        services: &[&Service<'_>],
        served: &Served<'_>,
    ) -> Result<Verdict, AdapterError> {
        let plan = self.plan(services, served);
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
        let mut judged: Vec<(Kind, &str)> = Vec::new();
        for (name, resources) in changed {
            let doc = xds::discovery(revision, resources.as_array().cloned().unwrap_or_default());
            let bytes = serde_json::to_vec_pretty(&doc)
                .map_err(|e| AdapterError::Rejected(e.to_string()))?;
            files::write(name, &bytes)
                .map_err(|e| AdapterError::Retryable(format!("cannot write {name}: {e}")))?;
            self.writes += 1;
            if name == xds::RDS_FILE {
                self.rds_version = Some(revision);
            }
            self.written
                .insert(name.clone(), (resources.clone(), revision));
            if let Some(kind) = Kind::of_file(name) {
                judged.push((kind, name));
            }
        }
        // The files of services, hosts and listeners that are gone, once nothing names them.
        for name in files::list().map_err(AdapterError::Retryable)? {
            if comes_and_goes(&name) && !plan.iter().any(|(p, _)| *p == name) {
                files::remove(&name).map_err(AdapterError::Retryable)?;
                self.written.remove(&name);
            }
        }
        let mut kinds: Vec<Kind> = judged.iter().map(|(kind, _)| *kind).collect();
        kinds.dedup();
        let verdict = match before {
            Some(before) if !kinds.is_empty() => verdict(&before, &kinds)?,
            _ => Verdict::Taken,
        };
        if let Verdict::Refused(_) = verdict {
            // Envoy kept what it had: these files are not in force, whatever they hold.
            for (_, name) in judged {
                self.written.remove(name);
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
        // The whole desired state: the routes, every listener and cluster with them, and the
        // HTTPS routes and secrets where there are some (a renewal changes a secret alone).
        let detail = match detail {
            Some(detail) => Some(detail),
            None => {
                let gaps = self.gaps(&["lds.json", "cds.json"])?;
                match (!gaps.is_empty()).then(|| live::summary(&gaps)) {
                    Some(detail) => Some(detail),
                    None => self.tls_lag()?,
                }
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
                let secrets = self
                    .written
                    .keys()
                    .filter(|file| tls::is_secret_file(file))
                    .count();
                let certificates = match secrets {
                    0 => String::new(),
                    n => format!(" with {n} certificates"),
                };
                format!(
                    "Envoy runs routes version {rds_version}, and Harbor's {} listeners and {} clusters{certificates}",
                    count("lds.json"),
                    count("cds.json")
                )
            }),
        })
    }

    /// How the HTTPS routes and the secrets Envoy runs differ from those last written, if they
    /// do.
    fn tls_lag(&self) -> Result<Option<String>, AdapterError> {
        let dump = |resource: &str| -> Result<Value, AdapterError> {
            let text = admin_get(&format!("/config_dump?resource={resource}"))?;
            Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
        };
        if let Some((_, version)) = self.written.get(xds::TLS_RDS_FILE) {
            let running = live::versions(&dump("dynamic_route_configs")?);
            let written = [(xds::TLS_ROUTE_CONFIG, *version)];
            if let Some(lag) = live::lag("routes", written, &running) {
                return Ok(Some(lag));
            }
        }
        let secrets: Vec<(String, u64)> = self
            .written
            .iter()
            .filter(|(file, _)| tls::is_secret_file(file))
            .flat_map(|(_, (resources, version))| {
                live::names(resources).into_iter().map(|n| (n, *version))
            })
            .collect();
        if secrets.is_empty() {
            return Ok(None);
        }
        let running = live::versions(&dump("dynamic_active_secrets")?);
        let written = secrets.iter().map(|(name, v)| (name.as_str(), *v));
        Ok(live::lag("secret", written, &running))
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
        // Once no listener refers to the routes or secrets and no cluster to its endpoints,
        // their files go too.
        if let Some(before) = before {
            verdict(&before, &[Kind::Listeners, Kind::Clusters])?;
        }
        for name in files::list().map_err(AdapterError::Retryable)? {
            if name == xds::RDS_FILE || comes_and_goes(&name) {
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

/// Whether Harbor writes `file` for some services only, and removes it once they are gone: an
/// EDS or SDS file, or the HTTPS listener's routes. `lds.json`, `cds.json` (which the bootstrap
/// names) and `rds.json` are always there.
fn comes_and_goes(file: &str) -> bool {
    (file.starts_with("eds-") && file.ends_with(".json"))
        || tls::is_secret_file(file)
        || file == xds::TLS_RDS_FILE
}

/// A resource type whose files Envoy judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Listeners,
    Clusters,
    Routes,
    TlsRoutes,
    Secrets,
}

impl Kind {
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
            xds::RDS_FILE => Some(Kind::Routes),
            xds::TLS_RDS_FILE => Some(Kind::TlsRoutes),
            _ if tls::is_secret_file(name) => Some(Kind::Secrets),
            _ => None,
        }
    }

    /// Whether `counter` counts this type's updates.
    fn counts(self, counter: &str) -> bool {
        match self {
            Kind::Listeners => counter.starts_with("listener_manager.lds."),
            Kind::Clusters => counter.starts_with("cluster_manager.cds."),
            Kind::Routes => counter.contains(&format!(".rds.{}.", xds::ROUTE_CONFIG)),
            Kind::TlsRoutes => counter.contains(&format!(".rds.{}.", xds::TLS_ROUTE_CONFIG)),
            Kind::Secrets => counter.starts_with(&format!("sds.{}", tls::secret_name(""))),
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

/// What a service looked like when Envoy judged it: the service, TLS and all, and the
/// certificates it is served with.
fn looks(s: &Service<'_>, served: &Served<'_>) -> String {
    format!("{s:?} {:x}", served.fingerprint(s))
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

#[cfg(test)]
mod tests {
    use super::*;
    use harbor_adapter_common::bindings::harbor::backend::types::{
        Certificate, CertificateSource, HashKey, HttpService, Https, TcpService, TcpTls,
        TlsSettings, Upstream,
    };
    use serde_json::json;

    fn files(tls_listen: &str) -> Files {
        let settings = format!(r#"{{"dir": "/run/h", "tls_listen": "{tls_listen}"}}"#);
        Files::new(Settings::parse(&settings).unwrap())
    }

    fn upstream(port: u16) -> Vec<Upstream> {
        vec![Upstream {
            address: format!("127.0.0.1:{port}"),
            weight: 1,
        }]
    }

    fn web(name: &str, hosts: &[&str], hsts: Option<&str>) -> HttpService {
        HttpService {
            name: name.into(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            path_prefix: "/".into(),
            upstreams: upstream(9001),
            strategy: "round-robin".into(),
            hash_key: HashKey::ClientIp,
            health: None,
            https: Some(Https {
                certificates: hosts.iter().map(|_| CertificateSource::Acme).collect(),
                redirect_http: true,
                hsts: hsts.map(str::to_owned),
            }),
        }
    }

    fn tcp(name: &str, listen: &str, tls: TcpTls) -> TcpService {
        TcpService {
            name: name.into(),
            listen: listen.into(),
            upstreams: upstream(5432),
            strategy: "round-robin".into(),
            health: None,
            tls,
        }
    }

    fn cert(host: &str, serial: u32) -> Certificate {
        Certificate {
            host: host.into(),
            chain: format!("-----BEGIN CERTIFICATE-----\n{host} {serial}\n"),
            key: format!("-----BEGIN PRIVATE KEY-----\nsecret of {host} {serial}\n"),
        }
    }

    fn state(
        http: Vec<HttpService>,
        tcp: Vec<TcpService>,
        certs: Vec<Certificate>,
    ) -> DesiredState {
        DesiredState {
            revision: 7,
            http,
            tcp,
            refresh_fallbacks: false,
            tls: TlsSettings {
                acme_directory: String::new(),
                acme_email: None,
                acme_ca_root: None,
                local_ca: None,
            },
            certificates: certs,
        }
    }

    /// The files `f` would write for `state`, by name.
    fn plan(f: &Files, state: &DesiredState) -> BTreeMap<String, Value> {
        let (http, tcp) = (http_services(state), tcp_services(state));
        let certs = certificates(state);
        let served = Served::new(&f.settings, &certs);
        let (offered, _) = f.offer(http.iter().chain(tcp.iter()).collect(), &served);
        f.plan(&offered, &served).into_iter().collect()
    }

    fn listener<'v>(plan: &'v BTreeMap<String, Value>, name: &str) -> &'v Value {
        plan["lds.json"]
            .as_array()
            .and_then(|all| all.iter().find(|l| l["name"] == name))
            .unwrap_or_else(|| panic!("no listener {name} in {}", plan["lds.json"]))
    }

    #[test]
    fn https_is_one_listener_with_a_filter_chain_per_certificate() {
        let s = state(
            vec![
                web("shop", &["shop.test", "*.shop.test"], None),
                web("blog", &["blog.test", "new.test"], None),
            ],
            vec![],
            // new.test has no certificate yet.
            vec![
                cert("shop.test", 1),
                cert("*.shop.test", 1),
                cert("blog.test", 1),
            ],
        );
        let p = plan(&files("127.0.0.1:8443"), &s);
        let secrets: Vec<&str> = p
            .keys()
            .filter(|n| n.starts_with("sds-"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            secrets,
            [
                "sds-_wildcard.shop.test.json",
                "sds-blog.test.json",
                "sds-shop.test.json"
            ]
        );
        assert_eq!(
            p["sds-_wildcard.shop.test.json"][0]["name"],
            "harbor_cert_*.shop.test"
        );
        let https = listener(&p, "harbor_https");
        assert_eq!(
            https["address"],
            json!({"socket_address": {"address": "127.0.0.1", "port_value": 8443}})
        );
        let names: Vec<&Value> = https["filter_chains"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["filter_chain_match"]["server_names"])
            .collect();
        assert_eq!(
            names,
            [
                &json!(["*.shop.test"]),
                &json!(["blog.test"]),
                &json!(["shop.test"])
            ]
        );
        let chain = &https["filter_chains"][2];
        assert_eq!(
            chain["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificate_sds_secret_configs"]
                [0]["sds_config"]["path_config_source"]["path"],
            "/run/h/sds-shop.test.json"
        );
        let tls_routes = &p["rds-tls.json"][0];
        assert_eq!(tls_routes["name"], "harbor_routes_tls");
        let domains: Vec<&Value> = tls_routes["virtual_hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| &v["domains"][0])
            .collect();
        assert_eq!(domains, ["*.shop.test", "blog.test", "shop.test"]);
        // new.test stays on plain HTTP, unredirected; the rest redirect.
        let plain = &p["rds.json"][0]["virtual_hosts"];
        let vh = |host: &str| {
            plain
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["domains"][0] == host)
                .unwrap()
                .clone()
        };
        assert_eq!(
            vh("new.test")["routes"][0]["route"]["cluster"],
            "harbor_blog"
        );
        assert_eq!(
            vh("blog.test")["routes"][0]["redirect"]["port_redirect"],
            8443
        );

        // Without tls_listen: no HTTPS listener, no secrets, no TLS routes.
        let p = plan(&files(""), &s);
        assert!(
            p.keys()
                .all(|n| !n.starts_with("sds-") && n != "rds-tls.json")
        );
        assert_eq!(p["lds.json"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_renewal_rewrites_only_its_secret_file() {
        let services = || {
            (
                vec![web("shop", &["shop.test", "www.test"], Some("max-age=60"))],
                vec![tcp(
                    "db",
                    "127.0.0.1:5433",
                    TcpTls::Terminate(vec!["shop.test".into()]),
                )],
            )
        };
        let f = files("127.0.0.1:8443");
        let (http, tcp) = services();
        let before = plan(
            &f,
            &state(http, tcp, vec![cert("shop.test", 1), cert("www.test", 1)]),
        );
        let (http, tcp) = services();
        let after = plan(
            &f,
            &state(http, tcp, vec![cert("shop.test", 2), cert("www.test", 1)]),
        );
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>()
        );
        let changed: Vec<&String> = after
            .iter()
            .filter(|(name, resources)| before[*name] != **resources)
            .map(|(name, _)| name)
            .collect();
        assert_eq!(changed, ["sds-shop.test.json"]);
        assert_eq!(
            after["sds-shop.test.json"][0]["tls_certificate"]["certificate_chain"]["inline_string"],
            "-----BEGIN CERTIFICATE-----\nshop.test 2\n"
        );
    }

    #[test]
    fn passthrough_services_share_a_listener_per_listen_address() {
        let pass =
            |names: &[&str]| TcpTls::Passthrough(names.iter().map(|n| (*n).into()).collect());
        let s = state(
            vec![],
            vec![
                tcp("a", "127.0.0.1:8444", pass(&["a.test"])),
                tcp("b", "127.0.0.1:8444", pass(&["b.test", "*.b.test"])),
                tcp("c", "127.0.0.1:8445", pass(&["c.test"])),
                tcp("plain", "127.0.0.1:5432", TcpTls::None),
            ],
            vec![],
        );
        let p = plan(&files(""), &s);
        let names: Vec<&Value> = p["lds.json"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| &l["name"])
            .collect();
        assert_eq!(
            names,
            [
                "harbor_http",
                "harbor_tcp_plain",
                "harbor_sni_8444",
                "harbor_sni_8445"
            ]
        );
        let shared = listener(&p, "harbor_sni_8444");
        assert_eq!(
            shared["listener_filters"][0]["name"],
            "envoy.filters.listener.tls_inspector"
        );
        assert_eq!(shared["enable_reuse_port"], false);
        let chains = shared["filter_chains"].as_array().unwrap();
        assert_eq!(chains.len(), 2);
        assert_eq!(
            chains[1]["filter_chain_match"]["server_names"],
            json!(["b.test", "*.b.test"])
        );
        assert_eq!(
            chains[1]["filters"][0]["typed_config"]["cluster"],
            "harbor_b"
        );
        assert!(chains[1].get("transport_socket").is_none());
        // Every passthrough service keeps its own cluster.
        assert_eq!(p["cds.json"].as_array().unwrap().len(), 4);

        // Two addresses on one port: named by address too.
        let s = state(
            vec![],
            vec![
                tcp("a", "127.0.0.1:8444", pass(&["a.test"])),
                tcp("b", "127.0.0.2:8444", pass(&["b.test"])),
            ],
            vec![],
        );
        let p = plan(&files(""), &s);
        listener(&p, "harbor_sni_127.0.0.1_8444");
        listener(&p, "harbor_sni_127.0.0.2_8444");
    }

    #[test]
    fn terminating_tcp_services_wait_for_a_certificate() {
        let names = || TcpTls::Terminate(vec!["db.test".into(), "db2.test".into()]);
        let f = files("");
        let waiting = state(vec![], vec![tcp("db", "127.0.0.1:5433", names())], vec![]);
        let (tcp_s, certs) = (tcp_services(&waiting), certificates(&waiting));
        let served = Served::new(&f.settings, &certs);
        let (offered, refused) = f.offer(tcp_s.iter().collect(), &served);
        assert!(offered.is_empty());
        assert_eq!(refused[0].name, "db");
        assert_eq!(
            refused[0].reason,
            "waiting for a certificate for db.test, db2.test"
        );

        // Once one of its names has a certificate, it is served with it, tls_listen or not.
        let ready = state(
            vec![],
            vec![tcp("db", "127.0.0.1:5433", names())],
            vec![cert("db2.test", 1)],
        );
        let p = plan(&f, &ready);
        let chain = &listener(&p, "harbor_tcp_db")["filter_chains"][0];
        assert_eq!(
            chain["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificate_sds_secret_configs"]
                [0]["name"],
            "harbor_cert_db2.test"
        );
        assert!(p.contains_key("sds-db2.test.json"));
    }

    #[test]
    fn render_shows_secrets_without_their_keys() {
        let s = state(
            vec![web("shop", &["shop.test"], None)],
            vec![],
            vec![cert("shop.test", 1)],
        );
        let docs = files("127.0.0.1:8443").render(&s).unwrap();
        let secret = docs
            .iter()
            .find(|d| d.target == "sds-shop.test.json")
            .expect("the secret's document");
        assert!(secret.content.contains("shop.test 1"), "{}", secret.content);
        assert!(secret.content.contains(tls::HIDDEN_KEY));
        for d in &docs {
            assert!(
                !d.content.contains("secret of"),
                "{}: {}",
                d.target,
                d.content
            );
        }
        let targets: Vec<&str> = docs.iter().map(|d| d.target.as_str()).collect();
        assert!(targets.contains(&"rds-tls.json"), "{targets:?}");
    }
}
