//! The backend driver: keeps the active backend adapter (and so the real proxy) in step with
//! the registry, split by job:
//!
//! - [`desired`]: what the registry says the proxy should run;
//! - [`reconciler`]: the loop that applies it, coalesced, retried, probed for drift, and that
//!   swaps adapters at runtime (the new one gets the full desired state before the old one
//!   retires);
//! - [`status`]: how the proxy stands, for the API, the metrics and the events;
//! - [`files`]: the adapter files of the plugins directory, swapped in as they change.
//!
//! [`Dispatcher`] is the handle the API and the daemon hold: the status, the specs of adapters,
//! and swaps, which it hands to the reconciler's task.

mod desired;
mod files;
mod reconciler;
mod status;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::backend::{Adapter, AdapterSpec, Capabilities, builtin};
use crate::config::{BackendKind, Config};
use crate::events::{Event, EventBus, lock};
use crate::metrics::Metrics;
use crate::model::ServiceView;
use crate::plugins::PluginEngine;
use crate::proxy::TcpCarriage;

pub use files::{AdapterFiles, rescan_adapters};
pub use reconciler::run;
pub use status::BackendStatus;

use reconciler::Loader;
use status::Book;

/// Deadline of each request to a proxy's admin API.
const HTTP_DEADLINE: Duration = Duration::from_secs(5);

/// Why a swap, or a render, was refused.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("{0}")]
    Load(String),
    #[error("the new adapter could not apply the current state: {0}")]
    Apply(String),
    #[error("the adapter could not render the state: {0}")]
    Render(String),
    #[error("no adapter is in force")]
    NoAdapter,
    #[error("the dispatcher has stopped")]
    Stopped,
}

/// What the API asks of the reconciler's task.
enum Request {
    /// Swap to this adapter.
    Swap {
        spec: AdapterSpec,
        reply: oneshot::Sender<Result<BackendStatus, SwapError>>,
    },
    /// What this adapter would write for the registry as it stands, writing nothing.
    DrySwap {
        spec: AdapterSpec,
        reply: oneshot::Sender<Result<Rendered, SwapError>>,
    },
    /// What the adapter in force would write for `services`, or with none, for the state it
    /// last applied.
    Render {
        services: Option<Vec<ServiceView>>,
        reply: oneshot::Sender<Result<Rendered, SwapError>>,
    },
}

/// What an adapter writes (or would write) for one state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rendered {
    pub adapter: String,
    pub version: String,
    /// The registry's revision the state is of; none when nothing has been applied yet.
    pub revision: Option<u64>,
    pub documents: Vec<RenderedDocument>,
}

/// One file, or one admin API document.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RenderedDocument {
    /// A file name in the adapter's directory, or an admin API path.
    pub target: String,
    /// The JSON written, or the text when it is not JSON.
    pub content: serde_json::Value,
}

impl RenderedDocument {
    fn of(document: crate::backend::Document) -> Self {
        let content = serde_json::from_str(&document.content)
            .unwrap_or(serde_json::Value::String(document.content));
        Self {
            target: document.target,
            content,
        }
    }
}

/// The dispatcher's handle, shared with the API.
pub struct Dispatcher {
    kind: BackendKind,
    config: Config,
    engine: Arc<PluginEngine>,
    book: Arc<Book>,
    requests: mpsc::Sender<Request>,
    /// Harbor's DNS responder for Caddy's dynamic upstreams.
    upstream_dns: Option<std::net::SocketAddr>,
    /// The version the driven Caddy reports, once it could be told.
    caddy_version: Mutex<Option<String>>,
    /// Whether Harbor's own TCP proxy carries the tcp routes; a swap moves them.
    tcp: TcpCarriage,
    tls: reconciler::TlsSource,
    /// Where Harbor answers ACME HTTP-01 challenges (an API listener), for Envoy to forward
    /// them to; set once the API is listening.
    acme_answerer: std::sync::OnceLock<std::net::SocketAddr>,
}

/// Where the dispatcher's task picks up.
pub struct Pending {
    requests: mpsc::Receiver<Request>,
}

impl Dispatcher {
    /// A dispatcher for the configured proxy, with its built-in adapter to load first.
    pub fn new(
        config: &Config,
        engine: Arc<PluginEngine>,
        bus: Arc<EventBus>,
        metrics: Arc<Metrics>,
        upstream_dns: Option<std::net::SocketAddr>,
        tcp: TcpCarriage,
        certificates: Option<Arc<crate::tls::Certificates>>,
    ) -> anyhow::Result<(Arc<Self>, Pending)> {
        let tls = reconciler::TlsSource {
            issuers: desired::Issuers {
                acme_directory: config.acme_directory.clone(),
                acme_email: config.acme_email.clone(),
                acme_ca_root: config.acme_ca_root.clone(),
                local_ca: certificates.as_ref().and_then(|c| c.ca_files()),
            },
            certificates,
        };
        let (requests, rx) = mpsc::channel(4);
        let dispatcher = Arc::new(Self {
            kind: config.backend,
            config: config.clone(),
            engine,
            book: Arc::new(Book::new(metrics, bus)),
            requests,
            upstream_dns,
            caddy_version: Mutex::new(None),
            tcp,
            tls,
            acme_answerer: std::sync::OnceLock::new(),
        });
        let name = config.backend.to_string();
        if builtin(&name).is_none() {
            anyhow::bail!("there is no built-in adapter named {name:?}");
        }
        Ok((dispatcher, Pending { requests: rx }))
    }

    pub fn status(&self) -> BackendStatus {
        self.book.status()
    }

    /// Tells where the API listens, for Envoy to send Harbor's ACME challenges there: the
    /// first TCP listener, reached over loopback when it listens on every address.
    pub fn set_acme_answerer(&self, api: &[std::net::SocketAddr]) {
        let Some(addr) = api.first() else {
            return;
        };
        let mut addr = *addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = self.acme_answerer.set(addr);
    }

    /// The proxy Harbor was started to drive.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Where the proxy driven now takes HTTP requests, for links to services.
    pub fn proxy_port(&self) -> u16 {
        match self.proxy_in_force().as_str() {
            "envoy" => self.config.proxy_listen.port(),
            _ => self.config.caddy_listen.port(),
        }
    }

    /// The proxy driven now: the active adapter's, which a swap may have changed.
    pub fn proxy_in_force(&self) -> String {
        let adapter = self.book.status().adapter;
        if adapter.is_empty() {
            self.kind.to_string()
        } else {
            adapter
        }
    }

    /// The spec of a built-in adapter with the capabilities and settings from the config;
    /// `overrides` (a JSON object) replaces settings key by key.
    pub async fn builtin_spec(
        &self,
        kind: BackendKind,
        overrides: Option<&serde_json::Value>,
    ) -> anyhow::Result<AdapterSpec> {
        let name = kind.to_string();
        let component = builtin(&name)
            .ok_or_else(|| anyhow::anyhow!("there is no built-in adapter named {name:?}"))?;
        self.spec_for(kind, component.into(), format!("builtin:{name}"), overrides)
            .await
    }

    /// The version the driven Caddy reports; asked until it answers, then remembered.
    async fn caddy_version(&self) -> String {
        if let Some(known) = lock(&self.caddy_version).clone() {
            return known;
        }
        match crate::backend::caddy::version(&self.config.caddy_admin).await {
            Ok(version) => {
                tracing::info!(%version, "driving Caddy");
                *lock(&self.caddy_version) = Some(version.clone());
                self.book.edit(|s| s.proxy_version = Some(version.clone()));
                version
            }
            Err(why) => {
                tracing::warn!(reason = %why, "Caddy's version cannot be told; Harbor writes only what Caddy 2.6 understands");
                String::new()
            }
        }
    }

    /// A spec for `component` with the capabilities and default settings of proxy `kind`.
    pub async fn spec_for(
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
                    "tls_listen": c.caddy_tls_listen.map(|a| a.to_string()).unwrap_or_default(),
                    "upstream_dns": self.upstream_dns.map(|a| a.to_string()).unwrap_or_default(),
                    "version": self.caddy_version().await,
                }),
                Capabilities {
                    http: Some(c.caddy_admin.clone()),
                    files: None,
                    http_deadline: HTTP_DEADLINE,
                    read_only: false,
                },
            ),
            BackendKind::Envoy => {
                let dir = std::path::absolute(&c.envoy_dir)?;
                (
                    serde_json::json!({
                        "dir": dir.to_string_lossy(),
                        "listen": c.proxy_listen.to_string(),
                        "tls_listen": c.tls_listen.map(|a| a.to_string()).unwrap_or_default(),
                        "acme_answerer": self.acme_answerer.get().map(|a| a.to_string()).unwrap_or_default(),
                    }),
                    Capabilities {
                        http: Some(c.envoy_admin.clone()),
                        files: Some(dir),
                        http_deadline: HTTP_DEADLINE,
                        read_only: false,
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
        self.ask(|reply| Request::Swap { spec, reply }).await
    }

    /// What `spec`'s adapter would write for the registry as it stands: loaded with every
    /// write refused, and dropped after.
    pub async fn dry_swap(&self, mut spec: AdapterSpec) -> Result<Rendered, SwapError> {
        spec.capabilities.read_only = true;
        self.ask(|reply| Request::DrySwap { spec, reply }).await
    }

    /// What the adapter in force would write for `services`, writing nothing.
    pub async fn render(&self, services: Vec<ServiceView>) -> Result<Rendered, SwapError> {
        let services = Some(services);
        self.ask(|reply| Request::Render { services, reply }).await
    }

    /// What the adapter in force wrote for the state it last applied.
    pub async fn pushed(&self) -> Result<Rendered, SwapError> {
        self.ask(|reply| Request::Render {
            services: None,
            reply,
        })
        .await
    }

    async fn ask<R>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<R, SwapError>>) -> Request,
    ) -> Result<R, SwapError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(request(reply))
            .await
            .map_err(|_| SwapError::Stopped)?;
        answer.await.map_err(|_| SwapError::Stopped)?
    }

    fn fault_sink(&self) -> crate::backend::FaultSink {
        let (bus, metrics) = (self.book.bus.clone(), self.book.metrics.clone());
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
}

impl Loader<Adapter> for Dispatcher {
    async fn load(&self, spec: AdapterSpec) -> Result<Adapter, SwapError> {
        let cache = Some(self.config.state_dir.join("plugin-cache"));
        Adapter::load(self.engine.clone(), cache, spec, self.fault_sink())
            .await
            .map_err(|e| SwapError::Load(format!("{e:#}")))
    }
}
