//! Writing the xDS files and reading Envoy's verdict. Only files whose resources changed are
//! replaced, so an instance coming or going rewrites one EDS file and nothing else: Envoy
//! updates the endpoints without touching listeners, routes or clusters. Filesystem xDS has no
//! ACK/NACK, so `probe` reads the admin API: the route configuration's version must be the one
//! written, and no `update_rejected` counter may have grown since the write.

use std::collections::BTreeMap;

use serde_json::Value;

use harbor_adapter_common::bindings::exports::harbor::backend::adapter::{
    AdapterError, DesiredState, ProbeReport,
};
use harbor_adapter_common::bindings::harbor::backend::{files, http_client};
use harbor_adapter_common::{Service, http_services, tcp_services};

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
}

impl Files {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            written: BTreeMap::new(),
            rejected_before: None,
            rds_version: None,
            revision: 0,
        }
    }

    pub fn apply(&mut self, state: &DesiredState) -> Result<u64, AdapterError> {
        let (http, tcp) = (http_services(state), tcp_services(state));
        let all: Vec<&Service<'_>> = http.iter().chain(tcp.iter()).collect();

        // Endpoints first and listeners last: a new cluster finds its EDS file, a new route
        // finds its cluster, a new listener finds its routes.
        let eds = |i: usize| i < self.settings.eds_max && !xds::names_upstreams(all[i]);
        let mut plan: Vec<(String, Value)> = Vec::new();
        for (i, s) in all.iter().enumerate() {
            if eds(i) {
                plan.push((xds::eds_file(s.name), Value::Array(vec![xds::endpoints(s)])));
            }
        }
        plan.push((
            "cds.json".into(),
            Value::Array(
                all.iter()
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
        listeners.extend(tcp.iter().map(xds::tcp_listener));
        plan.push(("lds.json".into(), Value::Array(listeners)));

        let changed: Vec<&(String, Value)> = plan
            .iter()
            .filter(|(name, resources)| self.written.get(name).is_none_or(|(w, _)| w != resources))
            .collect();
        if !changed.is_empty() {
            self.rejected_before = rejected_counters().ok();
        }
        for (name, resources) in changed {
            let doc = xds::discovery(
                state.revision,
                resources.as_array().cloned().unwrap_or_default(),
            );
            let bytes = serde_json::to_vec_pretty(&doc)
                .map_err(|e| AdapterError::Rejected(e.to_string()))?;
            files::write(name, &bytes)
                .map_err(|e| AdapterError::Retryable(format!("cannot write {name}: {e}")))?;
            if name == "rds.json" {
                self.rds_version = Some(state.revision);
            }
            self.written
                .insert(name.clone(), (resources.clone(), state.revision));
        }
        // EDS files of services that are gone, once no cluster names them.
        let keep: Vec<String> = all
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
        self.revision = state.revision;
        Ok(state.revision)
    }

    pub fn probe(&mut self) -> Result<ProbeReport, AdapterError> {
        let Some(rds_version) = self.rds_version else {
            return Ok(ProbeReport {
                in_sync: false,
                applied_revision: None,
                detail: "nothing applied yet".into(),
            });
        };
        let rejected = rejected_counters()?;
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
        let live = live_route_version()?;
        let in_sync = live == Some(rds_version);
        Ok(ProbeReport {
            in_sync,
            applied_revision: if in_sync { Some(self.revision) } else { None },
            detail: match live {
                Some(v) if v == rds_version => format!("Envoy runs routes version {v}"),
                Some(v) => format!("Envoy runs routes version {v}, Harbor wrote {rds_version}"),
                None => "Envoy has not loaded Harbor's routes".into(),
            },
        })
    }

    pub fn release(&mut self) -> Result<(), AdapterError> {
        // Empty resource lists: Envoy drops Harbor's listeners and clusters.
        for name in ["lds.json", "cds.json"] {
            let doc = xds::discovery(self.revision + 1, Vec::new());
            let bytes = serde_json::to_vec_pretty(&doc)
                .map_err(|e| AdapterError::Rejected(e.to_string()))?;
            files::write(name, &bytes).map_err(AdapterError::Retryable)?;
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

/// Every `*.update_rejected` counter Envoy has, by name.
fn rejected_counters() -> Result<BTreeMap<String, u64>, AdapterError> {
    let text = admin_get("/stats?filter=update_rejected")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect())
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
