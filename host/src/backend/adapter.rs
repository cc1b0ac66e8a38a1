//! One loaded adapter. Its store lives on a thread of its own, so guest calls (which block on
//! the proxy's admin API or on file writes) never run on the async runtime; callers send it
//! work and await the answer. Every call runs under a deadline of guest time and a memory cap.
//! A call that traps poisons the instance: the adapter reports the fault, instantiates again
//! from its prepared component, configures the new instance the same way, and carries on. What
//! the proxy runs is untouched by a trap, so the last good configuration keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::oneshot;
use wasmtime::Store;

use super::bindings::{
    AdapterError, AdapterPlugin, AdapterPluginPre, AdapterState, Applied, CALL_BUDGET, Description,
    DesiredState, Document, ProbeReport, prepare,
};
use super::files::ConfinedDir;
use super::http::{BaseUrl, BoundHttp};
use crate::plugins::{FaultKind, PluginEngine, classify, content_hash, ticks};

/// What an adapter may reach.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    /// The one base URL its HTTP client is bound to.
    pub http: Option<BaseUrl>,
    /// The one directory its files live in.
    pub files: Option<PathBuf>,
    /// Deadline of each HTTP request.
    pub http_deadline: Duration,
    /// Refuse every write, for the adapter's whole life: one loaded for a dry run.
    pub read_only: bool,
}

/// Everything needed to load an adapter.
#[derive(Clone)]
pub struct AdapterSpec {
    /// Where the component came from, for people: `builtin:caddy`, a file path, `upload`.
    pub source: String,
    pub component: Arc<[u8]>,
    /// The adapter's settings, JSON.
    pub config: String,
    pub capabilities: Capabilities,
}

/// Why a call did not return the adapter's answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The adapter answered with an error of its own.
    #[error("{}", describe_adapter_error(.0))]
    Adapter(AdapterError),
    /// The guest trapped, timed out or ran out of memory; it has been instantiated again.
    #[error("the adapter failed ({kind}): {message}")]
    Fault { kind: FaultKind, message: String },
    /// The adapter's thread is gone.
    #[error("the adapter has stopped")]
    Gone,
}

impl CallError {
    /// Whether trying the same thing again later may work.
    pub fn retryable(&self) -> bool {
        !matches!(self, CallError::Adapter(AdapterError::Rejected(_)))
    }
}

fn describe_adapter_error(e: &AdapterError) -> String {
    match e {
        AdapterError::Retryable(m) => format!("the proxy is unavailable: {m}"),
        AdapterError::Rejected(m) => format!("the proxy rejected the configuration: {m}"),
    }
}

/// Told about every guest fault.
pub type FaultSink = Arc<dyn Fn(&str, FaultKind, &str) + Send + Sync>;

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// A running adapter. Dropping it ends its thread once queued calls are done.
pub struct Adapter {
    jobs: mpsc::Sender<Job>,
    pub description: Description,
    /// The component's content hash.
    pub hash: String,
    pub source: String,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("name", &self.description.name)
            .field("version", &self.description.version)
            .field("source", &self.source)
            .finish()
    }
}

impl Adapter {
    /// Compiles, instantiates, describes and configures an adapter on a new thread. Fails with
    /// a reason for people when any step does.
    pub async fn load(
        engine: Arc<PluginEngine>,
        cache: Option<PathBuf>,
        spec: AdapterSpec,
        faults: FaultSink,
    ) -> anyhow::Result<Adapter> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = oneshot::channel();
        let hash = content_hash(&spec.component);
        let source = spec.source.clone();
        std::thread::Builder::new()
            .name("harbor-adapter".into())
            .spawn(move || {
                let mut worker = match Worker::start(&engine, cache, &spec, faults) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(worker.description.clone()));
                while let Ok(job) = queue.recv() {
                    job(&mut worker);
                }
            })
            .context("cannot start an adapter thread")?;
        let description = ready
            .await
            .map_err(|_| anyhow::anyhow!("the adapter's thread ended while loading"))??;
        Ok(Adapter {
            jobs,
            description,
            hash,
            source,
        })
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Worker) -> R + Send + 'static,
    ) -> Result<R, CallError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |w| {
                let _ = tx.send(f(w));
            }))
            .map_err(|_| CallError::Gone)?;
        rx.await.map_err(|_| CallError::Gone)
    }

    pub async fn apply(&self, state: DesiredState) -> Result<Applied, CallError> {
        self.run(move |w| {
            w.call(|plugin, store| plugin.harbor_backend_adapter().call_apply(store, &state))
        })
        .await??
        .map_err(CallError::Adapter)
    }

    /// What `apply` would write for `state`, with every write refused while it runs.
    pub async fn render(&self, state: DesiredState) -> Result<Vec<Document>, CallError> {
        self.run(move |w| {
            let was = std::mem::replace(&mut w.store.data_mut().read_only, true);
            let rendered =
                w.call(|plugin, store| plugin.harbor_backend_adapter().call_render(store, &state));
            w.store.data_mut().read_only = was;
            rendered
        })
        .await??
        .map_err(CallError::Adapter)
    }

    pub async fn probe(&self) -> Result<ProbeReport, CallError> {
        self.run(|w| w.call(|plugin, store| plugin.harbor_backend_adapter().call_probe(store)))
            .await??
            .map_err(CallError::Adapter)
    }

    pub async fn release(&self) -> Result<(), CallError> {
        self.run(|w| w.call(|plugin, store| plugin.harbor_backend_adapter().call_release(store)))
            .await??
            .map_err(CallError::Adapter)
    }
}

struct Worker {
    engine: wasmtime::Engine,
    pre: AdapterPluginPre<AdapterState>,
    store: Store<AdapterState>,
    plugin: AdapterPlugin,
    description: Description,
    config: String,
    faults: FaultSink,
}

impl Worker {
    fn start(
        engine: &PluginEngine,
        cache: Option<PathBuf>,
        spec: &AdapterSpec,
        faults: FaultSink,
    ) -> anyhow::Result<Self> {
        let component = engine
            .compile(&spec.component, cache.as_deref())
            .context("not a WebAssembly component this host can run")?;
        let pre = prepare(engine.engine(), &component)?;
        let http = match &spec.capabilities.http {
            Some(base) => Some(BoundHttp::new(
                base.clone(),
                spec.capabilities.http_deadline,
            )?),
            None => None,
        };
        let files = match &spec.capabilities.files {
            Some(dir) => Some(ConfinedDir::new(dir)?),
            None => None,
        };
        let mut state = AdapterState::new("adapter", http, files);
        state.read_only = spec.capabilities.read_only;
        let (store, plugin) = instantiate(engine.engine(), &pre, state)?;
        let mut worker = Worker {
            engine: engine.engine().clone(),
            pre,
            store,
            plugin,
            description: Description {
                name: String::new(),
                version: String::new(),
                supports_tcp: false,
                obtains_certificates: false,
            },
            config: spec.config.clone(),
            faults,
        };
        let description = worker
            .call(|p, s| p.harbor_backend_adapter().call_describe(s))
            .map_err(|e| anyhow::anyhow!("describe: {e}"))?;
        check_description(&description)?;
        worker.store.data_mut().name = description.name.clone();
        worker.description = description;
        worker.configure()?;
        Ok(worker)
    }

    fn configure(&mut self) -> anyhow::Result<()> {
        let config = self.config.clone();
        self.call(|p, s| p.harbor_backend_adapter().call_configure(s, &config))
            .map_err(|e| anyhow::anyhow!("configure: {e}"))?
            .map_err(|why| anyhow::anyhow!("the adapter refused its configuration: {why}"))
    }

    /// Runs one guest call under the deadline; a fault is reported and the instance replaced.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&AdapterPlugin, &mut Store<AdapterState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        self.store.data_mut().start_call();
        self.store.set_epoch_deadline(budget_ticks());
        match f(&self.plugin, &mut self.store) {
            Ok(r) => Ok(r),
            Err(e) => {
                let (kind, message) = classify(&e);
                let name = self.store.data().name.clone();
                (self.faults)(&name, kind, &message);
                if let Err(e) = self.reinstantiate() {
                    tracing::error!(adapter = %name, error = %e, "cannot instantiate the adapter again");
                }
                Err(CallError::Fault { kind, message })
            }
        }
    }

    fn reinstantiate(&mut self) -> anyhow::Result<()> {
        // The capabilities (and the HTTP client's connection) move to the new store.
        let placeholder = Store::new(&self.engine, AdapterState::new("", None, None));
        let state = std::mem::replace(&mut self.store, placeholder).into_data();
        let (store, plugin) = instantiate(&self.engine, &self.pre, state)?;
        self.store = store;
        self.plugin = plugin;
        if !self.description.name.is_empty() {
            self.configure()?;
        }
        Ok(())
    }
}

fn budget_ticks() -> u64 {
    ticks(CALL_BUDGET)
}

fn instantiate(
    engine: &wasmtime::Engine,
    pre: &AdapterPluginPre<AdapterState>,
    state: AdapterState,
) -> anyhow::Result<(Store<AdapterState>, AdapterPlugin)> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| s.limits());
    store.epoch_deadline_callback(|mut ctx| ctx.data_mut().on_deadline());
    store.data_mut().start_call();
    store.set_epoch_deadline(budget_ticks());
    let plugin = pre
        .instantiate(&mut store)
        .map_err(|e| anyhow::anyhow!("cannot instantiate the adapter: {e:#}"))?;
    Ok((store, plugin))
}

fn check_description(d: &Description) -> anyhow::Result<()> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
    };
    if !ok(&d.name) {
        anyhow::bail!(
            "the adapter describes itself with an unusable name {:?}",
            d.name
        );
    }
    if !ok(&d.version) {
        anyhow::bail!(
            "the adapter describes itself with an unusable version {:?}",
            d.version
        );
    }
    Ok(())
}
