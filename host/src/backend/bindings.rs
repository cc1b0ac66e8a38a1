//! The adapter world's bindings (generated once, here, from `wit/backend`), the state each
//! adapter store carries, and the linker: an adapter's only capabilities are the bound HTTP
//! client, the confined directory, the log and a pause, plus harmless WASI (random numbers,
//! clocks).
//! Every other import traps.

use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, StoreLimits, StoreLimitsBuilder};

use super::files::ConfinedDir;
use super::http::BoundHttp;

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit/backend",
        world: "adapter-plugin",
    });
}

use generated::harbor::backend::{files, http_client, log, timer, types};

pub use generated::harbor::backend::types::{
    AdapterError, Applied, Certificate, CertificateSource, Description, DesiredState, Document,
    HashKey, HealthCheck, HttpService, Https, ProbeReport, RefusedService, TcpService, TcpTls,
    TlsSettings, Upstream,
};
pub use generated::{AdapterPlugin, AdapterPluginPre};

/// The version of the adapter contract this host speaks.
pub const CONTRACT: &str = "harbor:backend@0.6.0";

/// Linear memory an adapter instance may use: room for the JSON of a few thousand services.
pub const MEMORY_LIMIT: usize = 128 << 20;

/// Guest running time one call may use. Time blocked in the host's HTTP calls does not count:
/// a slow proxy is the HTTP deadline's business, not a runaway guest's.
pub const CALL_BUDGET: Duration = Duration::from_secs(2);

/// Wall-clock time one call may take in all, however it is spent (a guest that loops on
/// cheap HTTP calls).
pub const CALL_CEILING: Duration = Duration::from_secs(60);

pub struct AdapterState {
    /// The adapter's name, for its log lines.
    pub name: String,
    limits: StoreLimits,
    http: Option<BoundHttp>,
    files: Option<ConfinedDir>,
    /// While set, every write is refused: a dry run, or a render of what was pushed.
    pub read_only: bool,
    call_started: Instant,
    /// Time the current call spent blocked in host capabilities.
    blocked: Duration,
}

impl AdapterState {
    pub fn new(name: &str, http: Option<BoundHttp>, files: Option<ConfinedDir>) -> Self {
        Self {
            name: name.to_owned(),
            limits: StoreLimitsBuilder::new()
                .memory_size(MEMORY_LIMIT)
                .instances(8)
                .tables(16)
                .memories(4)
                .trap_on_grow_failure(true)
                .build(),
            http,
            files,
            read_only: false,
            call_started: Instant::now(),
            blocked: Duration::ZERO,
        }
    }

    pub fn limits(&mut self) -> &mut StoreLimits {
        &mut self.limits
    }

    /// Starts the clock of a new guest call.
    pub fn start_call(&mut self) {
        self.call_started = Instant::now();
        self.blocked = Duration::ZERO;
    }

    /// Called at each epoch deadline while the guest runs: interrupts it once it has used its
    /// budget of its own time, or the call's wall-clock ceiling.
    pub fn on_deadline(&mut self) -> wasmtime::Result<wasmtime::UpdateDeadline> {
        let wall = self.call_started.elapsed();
        let own = wall.saturating_sub(self.blocked);
        if own >= CALL_BUDGET || wall >= CALL_CEILING {
            return Ok(wasmtime::UpdateDeadline::Interrupt);
        }
        let left = CALL_BUDGET - own;
        Ok(wasmtime::UpdateDeadline::Continue(
            crate::plugins::ticks(left).max(1),
        ))
    }

    fn blocked<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let from = Instant::now();
        let r = f(self);
        self.blocked += from.elapsed();
        r
    }
}

impl types::Host for AdapterState {}

/// Why a write was refused while the adapter only renders.
const NOTHING_WRITTEN: &str = "refused, since this call only shows what would be written";

impl http_client::Host for AdapterState {
    fn send(
        &mut self,
        method: String,
        path: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Result<http_client::Response, http_client::HttpError> {
        let name = self.name.clone();
        if self.read_only && !matches!(method.as_str(), "GET" | "HEAD") {
            return Err(http_client::HttpError::Forbidden(format!(
                "{method} {path}: {NOTHING_WRITTEN}"
            )));
        }
        self.blocked(|s| match s.http.as_mut() {
            Some(http) => http
                .send(&method, &path, &headers, body)
                .map(|r| http_client::Response {
                    status: r.status,
                    headers: r.headers,
                    body: r.body,
                })
                .map_err(|e| {
                    tracing::debug!(adapter = %name, %method, %path, error = %e, "adapter HTTP call failed");
                    match e {
                        super::http::HttpError::Forbidden(why) => {
                            http_client::HttpError::Forbidden(why)
                        }
                        super::http::HttpError::Unreachable(why) => {
                            http_client::HttpError::Unreachable(why)
                        }
                        super::http::HttpError::Timeout => http_client::HttpError::Timeout,
                    }
                }),
            None => Err(http_client::HttpError::Forbidden(
                "this adapter was given no HTTP address".into(),
            )),
        })
    }
}

impl files::Host for AdapterState {
    fn write(&mut self, name: String, contents: Vec<u8>) -> Result<(), String> {
        if self.read_only {
            return Err(format!("writing {name}: {NOTHING_WRITTEN}"));
        }
        self.blocked(|s| with_dir(&s.files, |d| d.write(&name, &contents)))
    }

    fn read(&mut self, name: String) -> Result<Vec<u8>, String> {
        self.blocked(|s| with_dir(&s.files, |d| d.read(&name)))
    }

    fn remove(&mut self, name: String) -> Result<(), String> {
        if self.read_only {
            return Err(format!("removing {name}: {NOTHING_WRITTEN}"));
        }
        self.blocked(|s| with_dir(&s.files, |d| d.remove(&name)))
    }

    fn list(&mut self) -> Result<Vec<String>, String> {
        self.blocked(|s| with_dir(&s.files, |d| d.list()))
    }
}

fn with_dir<R>(
    dir: &Option<ConfinedDir>,
    f: impl FnOnce(&ConfinedDir) -> Result<R, String>,
) -> Result<R, String> {
    match dir {
        Some(d) => f(d),
        None => Err("this adapter was given no directory".into()),
    }
}

/// The longest pause an adapter may ask for at once.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

impl timer::Host for AdapterState {
    fn pause(&mut self, ms: u32) {
        // Each adapter runs on a thread of its own: blocking it holds up nothing else.
        let pause = Duration::from_millis(ms.into()).min(LONGEST_PAUSE);
        self.blocked(|_| std::thread::sleep(pause));
    }
}

impl log::Host for AdapterState {
    fn log(&mut self, level: log::Level, message: String) {
        let adapter = self.name.as_str();
        match level {
            log::Level::Debug => tracing::debug!(adapter, "{message}"),
            log::Level::Info => tracing::info!(adapter, "{message}"),
            log::Level::Warn => tracing::warn!(adapter, "{message}"),
            log::Level::Error => tracing::error!(adapter, "{message}"),
        }
    }
}

/// Prepares a component for instantiation with the adapter capabilities; harmless WASI is
/// defined, every other import traps when used.
pub fn prepare(
    engine: &Engine,
    component: &Component,
) -> anyhow::Result<AdapterPluginPre<AdapterState>> {
    let err = |e: wasmtime::Error| anyhow::anyhow!("{e:#}");
    let mut linker: Linker<AdapterState> = Linker::new(engine);
    generated::AdapterPlugin::add_to_linker::<AdapterState, HasSelf<AdapterState>>(
        &mut linker,
        |s| s,
    )
    .map_err(err)?;
    for (name, _) in component.component_type().imports(engine) {
        crate::plugins::define_pure_wasi(&mut linker, name).map_err(err)?;
    }
    linker
        .define_unknown_imports_as_traps(component)
        .map_err(err)?;
    let pre = linker.instantiate_pre(component).map_err(err)?;
    AdapterPluginPre::new(pre).map_err(|e| {
        anyhow::anyhow!("the component does not export {CONTRACT}'s `adapter` interface: {e:#}")
    })
}
