//! The strategies Harbor knows: one slot per name, which routes hold and a hot swap replaces
//! atomically, so the next pick of every route using the name goes to the new version while
//! picks already under way finish on the old one.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::{ArcSwapOption, Guard};
use serde::Serialize;
use wasmtime::component::Linker;

use super::engine::PluginEngine;
use super::guest::{self, GuestState};
use super::report::Reporter;
use super::strategy::{Loaded, Rejected, Source};
use crate::events::lock;
use crate::model::timestamp;

/// The strategies compiled into the binary: (package, component).
const BUILTINS: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/builtins.rs"));

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
    /// `active`, `disabled` (its breaker tripped; back after `disabled_for_ms`) or `rejected`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_for_ms: Option<u64>,
    pub faults: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
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
                                Source::Builtin,
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

    pub fn names(&self) -> Vec<String> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots
            .values()
            .filter(|s| s.current().is_some())
            .map(|s| s.name.clone())
            .collect()
    }

    /// Records a plugin file that could not even be read (too large, unreadable): reported and
    /// listed as a rejection, as a component that fails its checks is.
    pub fn refuse(&self, source: Source, reason: &str) {
        let key = source.to_string();
        // Listed before it is told, so that whoever hears of it finds it.
        lock(&self.errors).insert(key.clone(), (key.clone(), reason.to_owned()));
        self.reporter.rejected(&key, reason);
    }

    /// Checks a component and, if it passes, puts it in force under the name it describes.
    /// `expected` is the name the caller asked for (the API's URL), which must match. A
    /// component that fails leaves the version in force untouched.
    pub fn install(
        &self,
        bytes: &[u8],
        source: Source,
        expected: Option<&str>,
    ) -> Result<PluginInfo, Rejected> {
        let key = expected.map_or_else(|| source.to_string(), str::to_owned);
        let outcome = Loaded::admit(
            &self.engine,
            self.cache_dir.as_deref(),
            &self.base,
            bytes,
            source.clone(),
            self.reporter.clone(),
        )
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
        let loaded = match outcome {
            Ok(loaded) => loaded,
            Err(rejected) => {
                lock(&self.errors).insert(key, (source.to_string(), rejected.0.clone()));
                self.reporter.rejected(&source.to_string(), &rejected.0);
                return Err(rejected);
            }
        };
        let name = loaded.name.to_string();
        self.reporter.loaded(
            &name,
            &loaded.description.version,
            &loaded.hash,
            &source.to_string(),
        );
        let loaded = Arc::new(loaded);
        let info = info(&loaded, None);
        {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            match slots.get(&name) {
                Some(slot) => slot.current.store(Some(loaded)),
                None => {
                    slots.insert(
                        name.clone(),
                        Arc::new(Slot {
                            name: name.clone(),
                            current: ArcSwapOption::new(Some(loaded)),
                            reporter: self.reporter.clone(),
                        }),
                    );
                }
            }
        }
        let mut errors = lock(&self.errors);
        errors.remove(&name);
        errors.remove(&source.to_string());
        Ok(info)
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
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<PluginInfo> = slots
            .values()
            .filter_map(|s| {
                let current = s.current();
                let loaded = current.as_ref()?;
                Some(info(loaded, errors.get(&s.name).map(|(_, e)| e.clone())))
            })
            .collect();
        for (key, (source, error)) in &errors {
            if !out.iter().any(|p| p.name.as_deref() == Some(key.as_str())) {
                out.push(PluginInfo {
                    name: (!key.contains(':')).then(|| key.clone()),
                    kind: "strategy",
                    version: None,
                    hash: None,
                    source: source.clone(),
                    state: "rejected",
                    disabled_for_ms: None,
                    faults: 0,
                    loaded_at: None,
                    last_error: Some(error.clone()),
                });
            }
        }
        out
    }
}

/// Runs the admission check on a component without a daemon (`harbor plugin check`).
pub fn check(bytes: &[u8], source: Source) -> anyhow::Result<Result<PluginInfo, Rejected>> {
    let engine = PluginEngine::shared()?;
    let base = guest::base_linker(engine.engine())?;
    let bus = Arc::new(crate::events::EventBus::new(16));
    let metrics = Arc::new(crate::metrics::Metrics::new()?);
    let reporter = Arc::new(Reporter::new(bus, metrics));
    Ok(Loaded::admit(&engine, None, &base, bytes, source, reporter).map(|l| info(&l, None)))
}

fn info(loaded: &Loaded, last_error: Option<String>) -> PluginInfo {
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
    }
}
