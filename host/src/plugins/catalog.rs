//! The strategies Harbor knows: one slot per name, which routes hold and a hot swap replaces
//! atomically, so the next pick of every route using the name goes to the new version while
//! picks already under way finish on the old one.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::{ArcSwapOption, Guard};
use serde::Serialize;
use wasmtime::component::Linker;

use super::engine::{PluginEngine, content_hash};
use super::guest::{self, GuestState};
use super::limits::{Setup, Shown};
use super::report::Reporter;
use super::strategy::{Loaded, Rejected, Source};
use crate::events::lock;
use crate::model::{StrategySettings, timestamp};

/// The strategies compiled into the binary: (package, component).
pub(super) const BUILTINS: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/builtins.rs"));

/// Used when a route names no strategy, and by the host's own fallback.
pub const DEFAULT_STRATEGY: &str = "round-robin";

pub struct Slot {
    pub name: String,
    current: ArcSwapOption<Loaded>,
    pub(super) reporter: Arc<Reporter>,
}

impl Slot {
    /// The version in force, if any.
    pub fn current(&self) -> Guard<Option<Arc<Loaded>>> {
        self.current.load()
    }
}

/// A plugin as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    pub name: Option<String>,
    pub kind: &'static str,
    pub version: Option<String>,
    pub hash: Option<String>,
    pub source: String,
    /// `active`, `disabled` (its breaker tripped; back after `disabled_for_ms`), `compiling`
    /// (uploaded, not yet checked; nothing of that name in force) or `rejected`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_for_ms: Option<u64>,
    pub faults: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The limits it runs under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<Shown>,
    /// Its plugin-wide settings, when it has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings: Option<StrategySettings>,
    /// A version on its way: uploaded, being compiled and checked. What is in force serves
    /// until it passes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compiling: Option<Pending>,
}

/// A version being compiled and checked.
#[derive(Debug, Clone, Serialize)]
pub struct Pending {
    pub hash: String,
    pub source: String,
    pub since: String,
}

/// A compile under way, for the key it will be listed under (the expected name, or the source).
struct Compiling {
    ticket: u64,
    pending: Pending,
}

/// The right to put one begun version in force, unless a later one of the same key began since.
pub struct Ticket {
    key: String,
    number: u64,
}

pub struct Strategies {
    engine: Arc<PluginEngine>,
    cache_dir: Option<PathBuf>,
    base: Linker<GuestState>,
    reporter: Arc<Reporter>,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    /// The last rejection per plugin name (or per source, when no name is known).
    errors: Mutex<BTreeMap<String, (String, String)>>,
    builtin_names: HashSet<String>,
    default: Arc<Slot>,
    compiling: Mutex<BTreeMap<String, Compiling>>,
    /// One compile at a time: a compile uses every core, and each holds its component's code
    /// in memory several times over while it runs.
    compile_gate: Mutex<()>,
    tickets: std::sync::atomic::AtomicU64,
}

impl Strategies {
    /// Loads the built-in strategies (compiled in parallel: this is start-up time).
    pub fn new(
        engine: Arc<PluginEngine>,
        cache_dir: Option<PathBuf>,
        reporter: Arc<Reporter>,
    ) -> anyhow::Result<Arc<Self>> {
        let base = guest::base_linker(engine.engine())?;
        let loaded: Vec<(&str, Result<Loaded, Rejected>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = BUILTINS
                .iter()
                .map(|(package, bytes)| {
                    let (engine, base, reporter) = (&engine, &base, &reporter);
                    let cache = cache_dir.as_deref();
                    (
                        *package,
                        scope.spawn(move || {
                            Loaded::admit(
                                engine,
                                cache,
                                base,
                                bytes,
                                (Source::Builtin, Setup::default()),
                                reporter.clone(),
                            )
                        }),
                    )
                })
                .collect();
            handles
                .into_iter()
                .map(|(package, h)| {
                    let result = h
                        .join()
                        .unwrap_or_else(|_| Err(Rejected("the check panicked".into())));
                    (package, result)
                })
                .collect()
        });
        let mut slots = BTreeMap::new();
        let mut builtin_names = HashSet::new();
        for (package, result) in loaded {
            // A built-in that fails its own check is a build defect, not an operator's problem.
            let loaded = result.map_err(|e| anyhow::anyhow!("built-in strategy {package}: {e}"))?;
            let name = loaded.name.to_string();
            builtin_names.insert(name.clone());
            slots.insert(
                name.clone(),
                Arc::new(Slot {
                    name,
                    current: ArcSwapOption::from_pointee(loaded),
                    reporter: reporter.clone(),
                }),
            );
        }
        let default = slots.get(DEFAULT_STRATEGY).cloned().ok_or_else(|| {
            anyhow::anyhow!("the built-in {DEFAULT_STRATEGY} strategy is missing")
        })?;
        Ok(Arc::new(Self {
            engine,
            cache_dir,
            base,
            reporter,
            slots: RwLock::new(slots),
            errors: Mutex::new(BTreeMap::new()),
            builtin_names,
            default,
            compiling: Mutex::new(BTreeMap::new()),
            compile_gate: Mutex::new(()),
            tickets: std::sync::atomic::AtomicU64::new(1),
        }))
    }

    /// The slot of the default strategy, which always exists.
    pub fn default_slot(&self) -> Arc<Slot> {
        self.default.clone()
    }

    /// The slot for `name`, if a strategy of that name is or was loaded.
    pub fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Whether a strategy of this name is in force now.
    pub fn knows(&self, name: &str) -> bool {
        self.slot(name).is_some_and(|s| s.current().is_some())
    }

    /// Whether strategy `name`, as loaded now, accepts `settings` for a route (see
    /// [`Loaded::check_settings`]); runs guest code, so call it off the async runtime.
    pub fn check_settings(&self, name: &str, settings: &StrategySettings) -> Result<(), String> {
        let loaded = self
            .slot(name)
            .and_then(|slot| slot.current().clone())
            .ok_or_else(|| format!("no strategy named {name:?} is loaded"))?;
        loaded
            .check_settings(settings.text())
            .map_err(|reason| format!("{name} refuses these settings: {reason}"))
    }

    pub fn names(&self) -> Vec<String> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots
            .values()
            .filter(|s| s.current().is_some())
            .map(|s| s.name.clone())
            .collect()
    }

    /// Records a plugin that was refused before any compile (a file too large or unreadable, an
    /// upload that is not a strategy component): reported and listed as a rejection, as a
    /// component that fails its checks is. `expected` is the name it was uploaded under.
    pub fn refuse(&self, source: Source, expected: Option<&str>, reason: &str) {
        let key = self.key_for(&source, expected);
        // Listed before it is told, so that whoever hears of it finds it.
        lock(&self.errors).insert(key, (source.to_string(), reason.to_owned()));
        self.reporter.rejected(&source.to_string(), reason);
    }

    /// What a version from `source` is listed under until it is in force: the name it was
    /// uploaded under, or that of the version its file gave before, or else its source.
    fn key_for(&self, source: &Source, expected: Option<&str>) -> String {
        expected
            .map(str::to_owned)
            .or_else(|| self.name_from(source))
            .unwrap_or_else(|| source.to_string())
    }

    /// Checks a component and, if it passes, puts it in force under the name it describes.
    /// `expected` is the name the caller asked for (the API's URL), which must match. A
    /// component that fails leaves the version in force untouched.
    pub fn install(
        &self,
        bytes: &[u8],
        source: Source,
        expected: Option<&str>,
        setup: Setup,
    ) -> Result<PluginInfo, Rejected> {
        let ticket = self.begin(bytes, &source, expected);
        self.install_begun(ticket, bytes, source, expected, setup)
    }

    /// Lists a version as compiling (and tells so) before its compile starts: the API answers
    /// the upload with this, and finishes it with [`Strategies::install_begun`] off the request.
    pub fn begin(&self, bytes: &[u8], source: &Source, expected: Option<&str>) -> Ticket {
        let key = self.key_for(source, expected);
        let number = self
            .tickets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pending = Pending {
            hash: content_hash(bytes),
            source: source.to_string(),
            since: timestamp(std::time::SystemTime::now()),
        };
        // Listed before it is told, so that whoever hears of it finds it.
        lock(&self.compiling).insert(
            key.clone(),
            Compiling {
                ticket: number,
                pending: pending.clone(),
            },
        );
        self.reporter
            .compiling(&key, &pending.hash, &pending.source);
        Ticket { key, number }
    }

    /// Compiles and checks a begun version and, if it passes and no later version of its key
    /// began meanwhile, puts it in force.
    pub fn install_begun(
        &self,
        ticket: Ticket,
        bytes: &[u8],
        source: Source,
        expected: Option<&str>,
        setup: Setup,
    ) -> Result<PluginInfo, Rejected> {
        let outcome = {
            let _gate = lock(&self.compile_gate);
            if !self.is_latest(&ticket) {
                return Err(Rejected(SUPERSEDED.into()));
            }
            Loaded::admit(
                &self.engine,
                self.cache_dir.as_deref(),
                &self.base,
                bytes,
                (source.clone(), setup),
                self.reporter.clone(),
            )
        }
        .and_then(|loaded| {
            let name = loaded.name.to_string();
            if self.builtin_names.contains(&name) {
                return Err(Rejected(format!(
                    "{name:?} is a built-in strategy; give the plugin another name"
                )));
            }
            if let Some(expected) = expected.filter(|e| *e != name) {
                return Err(Rejected(format!(
                    "the component describes itself as {name:?}, not {expected:?}"
                )));
            }
            Ok(loaded)
        });
        let mut compiling = lock(&self.compiling);
        if compiling
            .get(&ticket.key)
            .is_none_or(|c| c.ticket != ticket.number)
        {
            return Err(Rejected(SUPERSEDED.into()));
        }
        compiling.remove(&ticket.key);
        let loaded = match outcome {
            Ok(loaded) => loaded,
            Err(rejected) => {
                lock(&self.errors).insert(ticket.key, (source.to_string(), rejected.0.clone()));
                drop(compiling);
                self.reporter.rejected(&source.to_string(), &rejected.0);
                return Err(rejected);
            }
        };
        let name = loaded.name.to_string();
        let loaded = Arc::new(loaded);
        let info = info(&loaded, None, None);
        {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            match slots.get(&name) {
                Some(slot) => slot.current.store(Some(loaded.clone())),
                None => {
                    slots.insert(
                        name.clone(),
                        Arc::new(Slot {
                            name: name.clone(),
                            current: ArcSwapOption::new(Some(loaded.clone())),
                            reporter: self.reporter.clone(),
                        }),
                    );
                }
            }
        }
        {
            let mut errors = lock(&self.errors);
            errors.remove(&name);
            errors.remove(&source.to_string());
        }
        drop(compiling);
        self.reporter.loaded(
            &name,
            &loaded.description.version,
            &loaded.hash,
            &source.to_string(),
        );
        Ok(info)
    }

    fn is_latest(&self, ticket: &Ticket) -> bool {
        lock(&self.compiling)
            .get(&ticket.key)
            .is_some_and(|c| c.ticket == ticket.number)
    }

    /// Takes a custom strategy out of force; routes using it fall back to round-robin.
    pub fn remove(&self, name: &str) -> bool {
        if self.builtin_names.contains(name) {
            return false;
        }
        let Some(slot) = self.slot(name) else {
            return false;
        };
        let removed = slot.current.swap(None);
        if let Some(loaded) = &removed {
            // Its compiled code goes with it, once the last instance using it has.
            self.engine.forget(&loaded.hash);
            self.reporter.removed(name);
        }
        removed.is_some()
    }

    /// The name of the custom strategy loaded from `source`, if any.
    pub fn name_from(&self, source: &Source) -> Option<String> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots
            .values()
            .find(|s| s.current().as_ref().is_some_and(|l| l.source == *source))
            .map(|s| s.name.clone())
    }

    pub fn list(&self) -> Vec<PluginInfo> {
        let errors = lock(&self.errors).clone();
        let compiling: BTreeMap<String, Pending> = lock(&self.compiling)
            .iter()
            .map(|(key, c)| (key.clone(), c.pending.clone()))
            .collect();
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<PluginInfo> = slots
            .values()
            .filter_map(|s| {
                let current = s.current();
                let loaded = current.as_ref()?;
                Some(info(
                    loaded,
                    errors.get(&s.name).map(|(_, e)| e.clone()),
                    compiling.get(&s.name).cloned(),
                ))
            })
            .collect();
        let listed =
            |out: &[PluginInfo], key: &str| out.iter().any(|p| p.name.as_deref() == Some(key));
        for (key, pending) in &compiling {
            if !listed(&out, key) {
                let mut entry = unlisted(key, &pending.source, "compiling");
                entry.last_error = errors.get(key).map(|(_, e)| e.clone());
                entry.compiling = Some(pending.clone());
                out.push(entry);
            }
        }
        for (key, (source, error)) in &errors {
            if !listed(&out, key) {
                let mut entry = unlisted(key, source, "rejected");
                entry.last_error = Some(error.clone());
                out.push(entry);
            }
        }
        out
    }
}

/// Said of a version whose compile finished after a later one of the same name had begun: the
/// later one decides.
const SUPERSEDED: &str = "superseded by a later version of the same plugin";

/// An entry for a plugin nothing of which is in force.
fn unlisted(key: &str, source: &str, state: &'static str) -> PluginInfo {
    PluginInfo {
        name: (!key.contains(':')).then(|| key.to_owned()),
        kind: "strategy",
        version: None,
        hash: None,
        source: source.to_owned(),
        state,
        disabled_for_ms: None,
        faults: 0,
        loaded_at: None,
        last_error: None,
        limits: None,
        settings: None,
        compiling: None,
    }
}

/// Runs the admission check on a component without a daemon (`harbor plugin check`).
pub fn check(
    bytes: &[u8],
    source: Source,
    setup: Setup,
) -> anyhow::Result<Result<PluginInfo, Rejected>> {
    let engine = PluginEngine::shared()?;
    let base = guest::base_linker(engine.engine())?;
    let bus = Arc::new(crate::events::EventBus::new(16));
    let metrics = Arc::new(crate::metrics::Metrics::new()?);
    let reporter = Arc::new(Reporter::new(bus, metrics));
    Ok(
        Loaded::admit(&engine, None, &base, bytes, (source, setup), reporter)
            .map(|l| info(&l, None, None)),
    )
}

fn info(loaded: &Loaded, last_error: Option<String>, compiling: Option<Pending>) -> PluginInfo {
    let disabled = loaded.disabled_for();
    PluginInfo {
        name: Some(loaded.name.to_string()),
        kind: "strategy",
        version: Some(loaded.description.version.clone()),
        hash: Some(loaded.hash.clone()),
        source: loaded.source.to_string(),
        state: if disabled.is_some() {
            "disabled"
        } else {
            "active"
        },
        disabled_for_ms: disabled.map(|d| d.as_millis() as u64),
        faults: loaded.faults(),
        loaded_at: Some(timestamp(loaded.loaded_at)),
        last_error,
        limits: Some(loaded.limits.into()),
        settings: (!loaded.settings.is_empty()).then(|| loaded.settings.clone()),
        compiling,
    }
}
