//! The dispatcher: keeps the active backend adapter (and so the real proxy) in step with the
//! registry. It follows registry events from a cursor like the routing table does, coalesces
//! bursts into one apply per short window, retries with backoff while the proxy is down,
//! probes for drift (a restarted or hand-edited proxy) and re-applies in full, and swaps
//! adapters at runtime: the new one gets the full desired state before the old one retires.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::backend::{
    Adapter, AdapterError, AdapterSpec, CallError, Capabilities, DesiredState,
    HealthCheck as WitHealthCheck, HttpService, TcpService, Upstream, builtin,
};
use crate::backoff::Backoff;
use crate::config::{BackendKind, Config};
use crate::events::{Event, EventBus, Follower, Since, lock};
use crate::metrics::Metrics;
use crate::model::{HealthCheck, Protocol, ServiceView, timestamp};
use crate::plugins::PluginEngine;
use crate::registry::Registry;

/// A change waits this long for more before it is applied...
const QUIET: Duration = Duration::from_millis(20);
/// ...but never longer than this after the first change of a burst.
const MAX_DELAY: Duration = Duration::from_millis(150);
/// How often the proxy is checked for drift.
const PROBE_EVERY: Duration = Duration::from_millis(400);
/// Retries of an apply the proxy failed: 100 ms doubling to 5 s.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
/// Deadline of each request to a proxy's admin API.
const HTTP_DEADLINE: Duration = Duration::from_secs(5);

/// What `GET /api/v1/backend` shows.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BackendStatus {
    pub adapter: String,
    pub version: String,
    pub source: String,
    pub hash: String,
    pub supports_tcp: bool,
    /// The registry revision the proxy was last brought to.
    pub applied_revision: Option<u64>,
    pub applied_at: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub in_sync: bool,
    /// Applies that changed or confirmed the proxy since start.
    pub applies: u64,
}

/// The desired state in the host's own terms (comparable, unlike the generated types).
#[derive(Debug, Clone, PartialEq)]
struct Desired {
    http: Vec<DesiredService>,
    tcp: Vec<DesiredService>,
}

/// One service: `hosts` and `path` for HTTP, `listen` for TCP.
#[derive(Debug, Clone, PartialEq)]
struct DesiredService {
    name: String,
    hosts: Vec<String>,
    path: String,
    listen: String,
    upstreams: Vec<(String, u32)>,
    strategy: String,
    health: Option<HealthCheck>,
}

impl Desired {
    fn of(services: &[ServiceView], with_tcp: bool) -> Self {
        let mut http = Vec::new();
        let mut tcp = Vec::new();
        for s in services {
            let service = DesiredService {
                name: s.name.to_string(),
                hosts: s.route.hosts.iter().map(ToString::to_string).collect(),
                path: s
                    .route
                    .path
                    .as_ref()
                    .map_or("/".to_owned(), ToString::to_string),
                listen: s.route.listen.map(|l| l.to_string()).unwrap_or_default(),
                upstreams: s.upstream_addresses(),
                strategy: s.route.strategy.to_string(),
                health: s.proxy.health.clone(),
            };
            match s.route.protocol {
                Protocol::Http => http.push(service),
                Protocol::Tcp if with_tcp && s.route.listen.is_some() => tcp.push(service),
                Protocol::Tcp => {}
            }
        }
        http.sort_by(|a, b| a.name.cmp(&b.name));
        tcp.sort_by(|a, b| a.name.cmp(&b.name));
        Self { http, tcp }
    }

    fn services(&self) -> usize {
        self.http.len() + self.tcp.len()
    }

    fn to_wit(&self, revision: u64) -> DesiredState {
        let ups = |u: &[(String, u32)]| {
            u.iter()
                .map(|(address, weight)| Upstream {
                    address: address.clone(),
                    weight: *weight,
                })
                .collect()
        };
        DesiredState {
            revision,
            http: self
                .http
                .iter()
                .map(|s| HttpService {
                    name: s.name.clone(),
                    hosts: s.hosts.clone(),
                    path_prefix: s.path.clone(),
                    upstreams: ups(&s.upstreams),
                    strategy: s.strategy.clone(),
                    health: s.health.as_ref().map(health_to_wit),
                })
                .collect(),
            tcp: self
                .tcp
                .iter()
                .map(|s| TcpService {
                    name: s.name.clone(),
                    listen: s.listen.clone(),
                    upstreams: ups(&s.upstreams),
                    strategy: s.strategy.clone(),
                    health: s.health.as_ref().map(health_to_wit),
                })
                .collect(),
        }
    }
}

fn health_to_wit(h: &HealthCheck) -> WitHealthCheck {
    let ms = |d: std::time::Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    WitHealthCheck {
        http_path: h.path.clone(),
        expect_status: h.status,
        interval_ms: ms(h.interval),
        timeout_ms: ms(h.timeout),
        rise: h.rise,
        fall: h.fall,
    }
}

/// Why a swap was refused.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("{0}")]
    Load(String),
    #[error("the new adapter could not apply the current state: {0}")]
    Apply(String),
    #[error("the dispatcher has stopped")]
    Stopped,
}

struct SwapRequest {
    spec: AdapterSpec,
    reply: oneshot::Sender<Result<BackendStatus, SwapError>>,
}

/// The dispatcher's handle, shared with the API.
pub struct Dispatcher {
    kind: BackendKind,
    config: Config,
    engine: Arc<PluginEngine>,
    bus: Arc<EventBus>,
    metrics: Arc<Metrics>,
    status: Mutex<BackendStatus>,
    swaps: mpsc::Sender<SwapRequest>,
    /// Harbor's DNS responder for Caddy's dynamic upstreams.
    upstream_dns: Option<std::net::SocketAddr>,
}

/// Where the dispatcher's task picks up.
pub struct Pending {
    swaps: mpsc::Receiver<SwapRequest>,
    first: Option<AdapterSpec>,
}

impl Dispatcher {
    /// A dispatcher for the configured proxy, with its built-in adapter to load first.
    pub fn new(
        config: &Config,
        engine: Arc<PluginEngine>,
        bus: Arc<EventBus>,
        metrics: Arc<Metrics>,
        upstream_dns: Option<std::net::SocketAddr>,
    ) -> anyhow::Result<(Arc<Self>, Pending)> {
        let (swaps, rx) = mpsc::channel(4);
        let dispatcher = Arc::new(Self {
            kind: config.backend,
            config: config.clone(),
            engine,
            bus,
            metrics,
            status: Mutex::new(BackendStatus::default()),
            swaps,
            upstream_dns,
        });
        let first = dispatcher.builtin_spec(config.backend, None)?;
        Ok((
            dispatcher,
            Pending {
                swaps: rx,
                first: Some(first),
            },
        ))
    }

    pub fn status(&self) -> BackendStatus {
        lock(&self.status).clone()
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The spec of a built-in adapter with the capabilities and settings from the config;
    /// `overrides` (a JSON object) replaces settings key by key.
    pub fn builtin_spec(
        &self,
        kind: BackendKind,
        overrides: Option<&serde_json::Value>,
    ) -> anyhow::Result<AdapterSpec> {
        let name = kind.to_string();
        let component = builtin(&name)
            .ok_or_else(|| anyhow::anyhow!("there is no built-in adapter named {name:?}"))?;
        self.spec_for(kind, component.into(), format!("builtin:{name}"), overrides)
    }

    /// A spec for `component` with the capabilities and default settings of proxy `kind`.
    pub fn spec_for(
        &self,
        kind: BackendKind,
        component: Arc<[u8]>,
        source: String,
        overrides: Option<&serde_json::Value>,
    ) -> anyhow::Result<AdapterSpec> {
        let c = &self.config;
        let (mut settings, capabilities) = match kind {
            BackendKind::Caddy => (
                serde_json::json!({
                    "listen": c.caddy_listen.to_string(),
                    "upstream_dns": self.upstream_dns.map(|a| a.to_string()).unwrap_or_default(),
                }),
                Capabilities {
                    http: Some(c.caddy_admin.clone()),
                    files: None,
                    http_deadline: HTTP_DEADLINE,
                },
            ),
            BackendKind::Envoy => {
                let dir = std::path::absolute(&c.envoy_dir)?;
                (
                    serde_json::json!({
                        "dir": dir.to_string_lossy(),
                        "listen": c.proxy_listen.to_string(),
                    }),
                    Capabilities {
                        http: Some(c.envoy_admin.clone()),
                        files: Some(dir),
                        http_deadline: HTTP_DEADLINE,
                    },
                )
            }
            BackendKind::Embedded => anyhow::bail!("the embedded proxy has no adapter"),
        };
        if let Some(overrides) = overrides {
            let Some(map) = overrides.as_object() else {
                anyhow::bail!("config must be a JSON object");
            };
            for (k, v) in map {
                settings[k] = v.clone();
            }
        }
        Ok(AdapterSpec {
            source,
            component,
            config: settings.to_string(),
            capabilities,
        })
    }

    /// Loads `spec`, gives it the full desired state and only then retires the current
    /// adapter. On any failure the current adapter keeps serving.
    pub async fn swap(&self, spec: AdapterSpec) -> Result<BackendStatus, SwapError> {
        let (reply, answer) = oneshot::channel();
        self.swaps
            .send(SwapRequest { spec, reply })
            .await
            .map_err(|_| SwapError::Stopped)?;
        answer.await.map_err(|_| SwapError::Stopped)?
    }

    fn fault_sink(&self) -> crate::backend::FaultSink {
        let (bus, metrics) = (self.bus.clone(), self.metrics.clone());
        Arc::new(move |name: &str, kind, message: &str| {
            tracing::warn!(adapter = name, %kind, message, "backend adapter fault; it is instantiated again and the proxy keeps its last good configuration");
            metrics
                .plugin_faults
                .with_label_values(&[name, kind.as_str()])
                .inc();
            bus.publish(Event::PluginFault {
                name: name.to_owned(),
                fault: kind,
                message: message.to_owned(),
            });
        })
    }

    async fn load(&self, spec: AdapterSpec) -> Result<Adapter, SwapError> {
        let cache = Some(self.config.state_dir.join("plugin-cache"));
        Adapter::load(self.engine.clone(), cache, spec, self.fault_sink())
            .await
            .map_err(|e| SwapError::Load(format!("{e:#}")))
    }

    fn set_active(&self, adapter: &Adapter) {
        let mut s = lock(&self.status);
        s.adapter = adapter.description.name.clone();
        s.version = adapter.description.version.clone();
        s.source = adapter.source.clone();
        s.hash = adapter.hash.clone();
        s.supports_tcp = adapter.description.supports_tcp;
        self.metrics.backend.in_sync.set(0);
        s.in_sync = false;
    }

    fn record_applied(&self, revision: u64, services: usize, took: Duration) {
        let adapter = {
            let mut s = lock(&self.status);
            s.applied_revision = Some(revision);
            s.applied_at = Some(timestamp(SystemTime::now()));
            s.last_error = None;
            s.in_sync = true;
            s.applies += 1;
            s.adapter.clone()
        };
        self.metrics.backend.in_sync.set(1);
        self.metrics
            .backend
            .applies
            .with_label_values(&[adapter.as_str(), "ok"])
            .inc();
        self.metrics
            .backend
            .apply_seconds
            .observe(took.as_secs_f64());
        self.bus.publish(Event::BackendApplied {
            adapter,
            revision,
            services,
            millis: took.as_secs_f64() * 1000.0,
        });
    }

    /// Records a failure; events and warnings only when the reason changes, so a proxy that
    /// stays down does not flood the log.
    fn record_failed(&self, revision: u64, error: &CallError) {
        let reason = error.to_string();
        let (adapter, new) = {
            let mut s = lock(&self.status);
            let new = s.last_error.as_deref() != Some(reason.as_str());
            s.last_error = Some(reason.clone());
            s.last_error_at = Some(timestamp(SystemTime::now()));
            s.in_sync = false;
            (s.adapter.clone(), new)
        };
        self.metrics.backend.in_sync.set(0);
        let result = match error {
            CallError::Adapter(AdapterError::Rejected(_)) => "rejected",
            CallError::Adapter(AdapterError::Retryable(_)) => "retryable",
            CallError::Fault { .. } | CallError::Gone => "fault",
        };
        self.metrics
            .backend
            .applies
            .with_label_values(&[adapter.as_str(), result])
            .inc();
        if new {
            if error.retryable() {
                tracing::warn!(adapter = %adapter, revision, error = %reason, "the proxy is not in step with the registry; retrying with backoff");
            } else {
                tracing::error!(adapter = %adapter, revision, error = %reason, "the proxy refused the configuration; it keeps its previous one");
            }
            self.bus.publish(Event::BackendFailed {
                adapter,
                revision,
                reason,
                retryable: error.retryable(),
            });
        }
    }

    fn record_drift(&self, detail: &str) {
        let adapter = {
            let mut s = lock(&self.status);
            s.in_sync = false;
            s.adapter.clone()
        };
        tracing::warn!(adapter = %adapter, detail, "the proxy drifted from what Harbor applied; applying the full state again");
        self.metrics.backend.in_sync.set(0);
        self.metrics
            .backend
            .drifts
            .with_label_values(&[adapter.as_str()])
            .inc();
        self.bus.publish(Event::BackendDrift {
            adapter,
            detail: detail.to_owned(),
        });
    }
}

/// The dispatcher's loop state.
struct Reconciler {
    d: Arc<Dispatcher>,
    registry: Arc<Registry>,
    adapter: Option<Adapter>,
    /// The registry's events, followed.
    events: Follower<EventBus>,
    /// Set when the registry changed (or the proxy drifted) since the last apply.
    dirty_since: Option<Instant>,
    last_change: Instant,
    /// What the proxy was last brought to, successfully.
    applied: Option<Desired>,
    /// A state the proxy refused: not retried until the registry changes.
    refused: Option<Desired>,
    retry_at: Option<Instant>,
    /// Applies failed in a row.
    failures: u32,
    next_probe: Instant,
}

/// Runs the dispatcher until cancelled.
pub async fn run(
    dispatcher: Arc<Dispatcher>,
    pending: Pending,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) {
    let Pending { mut swaps, first } = pending;
    let mut r = Reconciler {
        d: dispatcher.clone(),
        registry: registry.clone(),
        adapter: None,
        events: Follower::new(registry.bus().clone(), registry.bus().last_id()),
        dirty_since: Some(Instant::now()),
        last_change: Instant::now(),
        applied: None,
        refused: None,
        retry_at: None,
        failures: 0,
        next_probe: Instant::now() + PROBE_EVERY,
    };
    if let Some(spec) = first {
        let source = spec.source.clone();
        match dispatcher.load(spec).await {
            Ok(adapter) => {
                dispatcher.set_active(&adapter);
                tracing::info!(adapter = %adapter.description.name, version = %adapter.description.version, %source, "backend adapter loaded");
                r.adapter = Some(adapter);
            }
            Err(e) => {
                tracing::error!(%source, error = %e, "the backend adapter cannot be loaded; the proxy is not driven until one is swapped in");
                lock(&dispatcher.status).last_error = Some(e.to_string());
            }
        }
    }
    loop {
        r.follow();
        r.step().await;
        let wake = r.next_wake();
        tokio::select! {
            changed = r.events.changed() => if !changed { return },
            Some(req) = swaps.recv() => {
                let result = r.swap(req.spec).await;
                let _ = req.reply.send(result);
            }
            () = tokio::time::sleep_until(wake.into()) => {}
            () = cancel.cancelled() => return,
        }
    }
}

impl Reconciler {
    fn follow(&mut self) {
        let relevant = match self.events.read() {
            Since::Events(events) => events.iter().any(|e| e.event.changes_routing()),
            Since::Gap => true,
        };
        if relevant {
            self.mark_dirty();
        }
    }

    fn mark_dirty(&mut self) {
        let now = Instant::now();
        self.last_change = now;
        self.dirty_since.get_or_insert(now);
    }

    fn next_wake(&self) -> Instant {
        let mut wake = self.next_probe;
        if let Some(since) = self.dirty_since {
            let due = (self.last_change + QUIET).min(since + MAX_DELAY);
            let due = self.retry_at.map_or(due, |r| r.max(due));
            wake = wake.min(due);
        }
        wake
    }

    async fn step(&mut self) {
        let now = Instant::now();
        if let Some(since) = self.dirty_since {
            let due = (self.last_change + QUIET).min(since + MAX_DELAY);
            if now >= due && self.retry_at.is_none_or(|r| now >= r) {
                self.apply().await;
            }
        }
        if Instant::now() >= self.next_probe {
            self.next_probe = Instant::now() + PROBE_EVERY;
            if self.dirty_since.is_none() && self.applied.is_some() {
                self.probe().await;
            }
        }
    }

    fn desired(&self) -> (u64, Desired) {
        let with_tcp = self
            .adapter
            .as_ref()
            .is_some_and(|a| a.description.supports_tcp);
        // The revision is read before the services, so it never claims more than they hold.
        let revision = self.registry.bus().last_id();
        (revision, Desired::of(&self.registry.services(), with_tcp))
    }

    async fn apply(&mut self) {
        let Some(adapter) = &self.adapter else {
            self.dirty_since = None;
            return;
        };
        let (revision, desired) = self.desired();
        if self.refused.as_ref() == Some(&desired) {
            self.dirty_since = None;
            return;
        }
        let started = Instant::now();
        match adapter.apply(desired.to_wit(revision)).await {
            Ok(applied) => {
                self.d
                    .record_applied(applied, desired.services(), started.elapsed());
                self.applied = Some(desired);
                self.refused = None;
                self.dirty_since = None;
                self.retry_at = None;
                self.failures = 0;
            }
            Err(e) => {
                self.d.record_failed(revision, &e);
                if e.retryable() {
                    self.failures += 1;
                    self.retry_at = Some(Instant::now() + RETRY.after(self.failures));
                } else {
                    self.refused = Some(desired);
                    self.dirty_since = None;
                }
            }
        }
    }

    async fn probe(&mut self) {
        let Some(adapter) = &self.adapter else {
            return;
        };
        match adapter.probe().await {
            Ok(report) if report.in_sync => {
                let mut s = lock(&self.d.status);
                if !s.in_sync {
                    s.in_sync = true;
                    s.last_error = None;
                    self.d.metrics.backend.in_sync.set(1);
                }
            }
            Ok(report) => {
                self.d.record_drift(&report.detail);
                self.applied = None;
                self.refused = None;
                self.retry_at = None;
                let now = Instant::now();
                // Applied at once: the quiet window is for bursts of registry changes.
                self.dirty_since = Some(now - MAX_DELAY);
                self.last_change = now - QUIET;
            }
            Err(e) => {
                let revision = lock(&self.d.status).applied_revision.unwrap_or(0);
                self.d.record_failed(revision, &e);
                if !e.retryable() {
                    self.refused = self.applied.take();
                }
            }
        }
    }

    async fn swap(&mut self, spec: AdapterSpec) -> Result<BackendStatus, SwapError> {
        let source = spec.source.clone();
        let result = self.try_swap(spec).await;
        let result_label = if result.is_ok() { "ok" } else { "failed" };
        self.d
            .metrics
            .backend
            .swaps
            .with_label_values(&[result_label])
            .inc();
        if let Err(e) = &result {
            tracing::warn!(%source, error = %e, "backend adapter swap refused; the current adapter keeps serving");
            self.d.bus.publish(Event::BackendSwapFailed {
                source,
                reason: e.to_string(),
            });
        }
        result
    }

    async fn try_swap(&mut self, spec: AdapterSpec) -> Result<BackendStatus, SwapError> {
        let new = self.d.load(spec).await?;
        let with_tcp = new.description.supports_tcp;
        let revision = self.registry.bus().last_id();
        let desired = Desired::of(&self.registry.services(), with_tcp);
        let started = Instant::now();
        let applied = new
            .apply(desired.to_wit(revision))
            .await
            .map_err(|e| SwapError::Apply(e.to_string()))?;
        let old = self.adapter.replace(new);
        let (from, released) = match old {
            Some(old) if old.description.name != self.adapter_name() => {
                // A different proxy: the old adapter removes what it put there.
                let released = old.release().await;
                if let Err(e) = &released {
                    tracing::warn!(adapter = %old.description.name, error = %e, "the old adapter could not remove its configuration");
                }
                (old.description.name.clone(), released.is_ok())
            }
            Some(old) => (old.description.name.clone(), false),
            None => (String::new(), false),
        };
        let Some(active) = &self.adapter else {
            return Err(SwapError::Stopped);
        };
        self.d.set_active(active);
        self.d
            .record_applied(applied, desired.services(), started.elapsed());
        self.applied = Some(desired);
        self.refused = None;
        self.dirty_since = None;
        self.retry_at = None;
        tracing::info!(from = %from, to = %active.description.name, version = %active.description.version, "backend adapter swapped");
        self.d.bus.publish(Event::BackendSwapped {
            from,
            to: active.description.name.clone(),
            version: active.description.version.clone(),
            released,
        });
        Ok(self.d.status())
    }

    fn adapter_name(&self) -> String {
        self.adapter
            .as_ref()
            .map(|a| a.description.name.clone())
            .unwrap_or_default()
    }
}

/// What the plugin directory's adapter files held at the last scan: path → content hash.
pub type AdapterFiles = Arc<Mutex<std::collections::HashMap<std::path::PathBuf, String>>>;

/// Swaps in each `backend-*.wasm` in the plugin directory that is new or changed since the
/// last scan (the last in name order wins). A refused file is not tried again until it changes.
/// Removing the file whose adapter is in force swaps the built-in adapter back in, the way
/// removing an override should; removing any other file changes nothing.
pub async fn rescan_adapters(
    dispatcher: &Arc<Dispatcher>,
    dir: &std::path::Path,
    seen: &AdapterFiles,
) {
    let dir = dir.to_owned();
    let found = tokio::task::spawn_blocking(move || {
        let mut files: Vec<(std::path::PathBuf, Result<Vec<u8>, String>)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(crate::plugins::ADAPTER_PREFIX) && n.ends_with(".wasm")
                })
            })
            .map(|p| {
                let bytes = crate::plugins::read_component(&p);
                (p, bytes)
            })
            .collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files
    })
    .await
    .unwrap_or_default();
    let gone: Vec<std::path::PathBuf> = lock(seen)
        .keys()
        .filter(|p| !found.iter().any(|(f, _)| f == *p))
        .cloned()
        .collect();
    for path in gone {
        lock(seen).remove(&path);
        if dispatcher.status().source != path.display().to_string() {
            continue;
        }
        tracing::info!(file = %path.display(), "the adapter in force was removed; going back to the built-in one");
        match dispatcher.builtin_spec(dispatcher.kind(), None) {
            // A refusal is logged and published by the swap itself.
            Ok(spec) => drop(dispatcher.swap(spec).await),
            Err(e) => tracing::warn!(error = %e, "no built-in adapter to go back to"),
        }
    }
    for (path, bytes) in found {
        let bytes = match bytes {
            Ok(b) => b,
            Err(reason) => {
                tracing::warn!(file = %path.display(), reason, "adapter file not loaded");
                continue;
            }
        };
        let hash = crate::plugins::content_hash(&bytes);
        if lock(seen).get(&path) == Some(&hash) {
            continue;
        }
        lock(seen).insert(path.clone(), hash);
        let source = path.display().to_string();
        let spec = match dispatcher.spec_for(dispatcher.kind(), bytes.into(), source.clone(), None)
        {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(file = %source, error = %e, "adapter file not loaded");
                continue;
            }
        };
        // A refusal is logged and published by the swap itself.
        let _ = dispatcher.swap(spec).await;
    }
}
