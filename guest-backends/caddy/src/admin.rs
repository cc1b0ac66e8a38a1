//! Caddy's admin API through the host's bound HTTP client. Every write is conditional
//! (`If-Match` with the `ETag` of the read it is based on), so a concurrent change by someone
//! else makes the write fail with `412` and the adapter reads again instead of overwriting it.

use serde_json::{Value, json};

use harbor_adapter_common::bindings::exports::harbor::backend::adapter::{
    AdapterError, DesiredState, ProbeReport,
};
use harbor_adapter_common::bindings::harbor::backend::http_client::{self, HttpError, Response};
use harbor_adapter_common::bindings::harbor::backend::log::{self, Level};
use harbor_adapter_common::http_services;

use crate::routes::{self, Features, Partitions, Settings};

/// Conditional writes retried after a `412` before the apply is given up (and retried later).
const MAX_CONFLICTS: usize = 5;

pub struct Admin {
    settings: Settings,
    /// The inner routes last written (or found already in place), and their revision.
    applied: Option<(u64, Value)>,
    /// What this Caddy understands; learned from rejections.
    features: Features,
}

struct Read {
    status: u16,
    etag: Option<String>,
    body: Value,
    text: String,
}

impl Admin {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            applied: None,
            features: Features::default(),
        }
    }

    fn inner_path(&self) -> String {
        format!("/id/{}/handle/0/routes", self.settings.route_id)
    }

    pub fn apply(&mut self, state: &DesiredState) -> Result<u64, AdapterError> {
        let services = http_services(state);
        let live = self
            .applied
            .as_ref()
            .map_or_else(Partitions::new, |(_, routes)| routes::partitions_of(routes));
        let build =
            |features| Value::Array(routes::routes(&services, &self.settings, features, &live));
        let mut desired = build(self.features);
        // What was last written is still in place unless a probe found otherwise (it forgets
        // `applied` then): instance churn of dynamic services costs Caddy nothing, not even a
        // read.
        if let Some((_, applied)) = &self.applied
            && *applied == desired
        {
            self.applied = Some((state.revision, desired));
            return Ok(state.revision);
        }
        let mut conflicts = 0;
        loop {
            let current = get(&self.inner_path())?;
            let written = if current.status != 200 {
                // The container route is gone (Caddy restarted from its Caddyfile) or was
                // never made: build it with the routes in it.
                self.create_container(&desired)?
            } else if current.body == desired {
                break;
            } else {
                send(
                    "PATCH",
                    &self.inner_path(),
                    current.etag.as_deref(),
                    &desired,
                )?
            };
            match written.status {
                200 if current.status != 200 => {
                    log::log(Level::Info, "created Harbor's container route in Caddy");
                    break;
                }
                200 => break,
                412 if conflicts < MAX_CONFLICTS => {
                    conflicts += 1;
                    log::log(
                        Level::Info,
                        "Harbor's routes changed under us; reading them again",
                    );
                }
                412 => {
                    return Err(AdapterError::Retryable(
                        "Harbor's routes keep changing under us".into(),
                    ));
                }
                _ if self.features.weighted && mentions_unknown_wrr(&written.text) => {
                    log::log(
                        Level::Info,
                        "this Caddy has no weighted_round_robin; weighted services use round_robin",
                    );
                    self.features.weighted = false;
                    desired = build(self.features);
                }
                _ if self.features.thresholds && mentions_thresholds(&written.text) => {
                    log::log(
                        Level::Info,
                        "this Caddy has no rise/fall thresholds on active health checks; it uses one check",
                    );
                    self.features.thresholds = false;
                    desired = build(self.features);
                }
                status => return Err(refusal(status, &written.text)),
            }
        }
        self.applied = Some((state.revision, desired));
        Ok(state.revision)
    }

    /// Inserts the container route, holding `inner`, first in the server that listens on the
    /// configured address (or the configured server), creating that server if none exists.
    /// Returns Caddy's answer to the write, for [`Admin::apply`] to judge like any other.
    fn create_container(&self, inner: &Value) -> Result<Read, AdapterError> {
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
        let port = self.settings.listen.rsplit_once(':').map(|(_, p)| p)?;
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

    pub fn probe(&mut self) -> Result<ProbeReport, AdapterError> {
        let current = get(&self.inner_path())?;
        let Some((revision, expected)) = &self.applied else {
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
        } else {
            ProbeReport {
                in_sync: true,
                applied_revision: Some(*revision),
                detail: "Harbor's routes are in place".into(),
            }
        };
        if !report.in_sync {
            self.applied = None;
        }
        Ok(report)
    }

    pub fn release(&mut self) -> Result<(), AdapterError> {
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
        self.applied = None;
        Ok(())
    }
}

fn mentions_unknown_wrr(text: &str) -> bool {
    text.contains("unknown module") && text.contains("weighted_round_robin")
}

fn mentions_thresholds(text: &str) -> bool {
    text.contains("unknown field \"passes\"") || text.contains("unknown field \"fails\"")
}

fn refusal(status: u16, text: &str) -> AdapterError {
    let message = format!("Caddy answered {status}: {}", text.trim());
    if (400..500).contains(&status) {
        AdapterError::Rejected(message)
    } else {
        AdapterError::Retryable(message)
    }
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
