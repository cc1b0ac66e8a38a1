//! The one wasmtime engine: configured for sandboxed, cheap synchronous calls, with an epoch
//! ticker for deadlines and a cache of precompiled components keyed by content hash.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine};

use crate::events::lock;

/// How often the epoch advances: the unit of every guest deadline. Fine enough that a looping
/// guest is stopped well within 50 ms, coarse enough that the ticker's wake-ups do not steal
/// CPU from a busy proxy (at 1 ms it woke 1,000 times a second, each time preempting a worker).
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// `deadline` in epoch ticks, rounded up.
pub const fn ticks(deadline: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    deadline.as_nanos().div_ceil(tick) as u64
}

pub struct PluginEngine {
    engine: Engine,
    /// Recently compiled components by content hash: a process compiles each component once,
    /// however many daemons (tests) or versions swapped back and forth use it.
    compiled: Mutex<VecDeque<(String, Component)>>,
    ticker_stop: Arc<AtomicBool>,
}

/// How many compiled components the memory cache keeps, besides those in use: enough to swap
/// back and forth between versions without compiling again. A component's native code can be
/// several times its size, so the cache is short.
const MEMORY_CACHE: usize = 8;

/// The most the precompiled files on disk may take; past it the least recently used go.
const DISK_CACHE_BYTES: u64 = 512 << 20;

static SHARED: OnceLock<Arc<PluginEngine>> = OnceLock::new();

/// A component's content hash, hex: names it in the API and keys the compile cache.
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl PluginEngine {
    /// The process's engine (one engine serves every daemon in the process).
    pub fn shared() -> anyhow::Result<Arc<Self>> {
        if let Some(engine) = SHARED.get() {
            return Ok(engine.clone());
        }
        let engine = Self::new()?;
        Ok(SHARED.get_or_init(|| engine).clone())
    }

    fn new() -> anyhow::Result<Arc<Self>> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Harbor makes only synchronous calls; the async machinery would cost every call.
        config.concurrency_support(false);
        config.max_wasm_stack(512 * 1024);
        let engine = Engine::new(&config)
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .context("cannot set up the WebAssembly engine")?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticking = engine.clone();
        let stop = ticker_stop.clone();
        // A plain thread: the ticker must keep time even when every tokio worker is busy.
        std::thread::Builder::new()
            .name("harbor-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .context("cannot start the epoch ticker")?;
        Ok(Arc::new(Self {
            engine,
            compiled: Mutex::new(VecDeque::new()),
            ticker_stop,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles a component, or takes it from the memory cache or the precompiled files in
    /// `cache_dir`, which must be private to Harbor: what it holds is loaded as native code.
    pub fn compile(&self, bytes: &[u8], cache_dir: Option<&Path>) -> anyhow::Result<Component> {
        let hash = content_hash(bytes);
        {
            let mut compiled = lock(&self.compiled);
            if let Some(entry) = compiled
                .iter()
                .position(|(h, _)| *h == hash)
                .and_then(|i| compiled.remove(i))
            {
                // Most recently used at the back, evicted last.
                let component = entry.1.clone();
                compiled.push_back(entry);
                return Ok(component);
            }
        }
        let component = self.compile_uncached(bytes, &hash, cache_dir)?;
        let mut compiled = lock(&self.compiled);
        if compiled.len() == MEMORY_CACHE {
            compiled.pop_front();
        }
        compiled.push_back((hash, component.clone()));
        Ok(component)
    }

    /// Whether the memory cache holds the compiled component of content hash `hash`.
    pub fn holds(&self, hash: &str) -> bool {
        lock(&self.compiled).iter().any(|(h, _)| h == hash)
    }

    /// Drops a removed plugin's compiled code from the memory cache; what still uses it keeps
    /// it until it lets go.
    pub fn forget(&self, hash: &str) {
        lock(&self.compiled).retain(|(h, _)| h != hash);
    }

    fn compile_uncached(
        &self,
        bytes: &[u8],
        hash: &str,
        cache_dir: Option<&Path>,
    ) -> anyhow::Result<Component> {
        let Some(dir) = cache_dir else {
            return self.compile_fresh(bytes);
        };
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the plugin cache");
            return self.compile_fresh(bytes);
        }
        restrict(dir);
        let path = self.cache_path(dir, hash);
        if path.exists() {
            // Used now: the last to be pruned.
            touch(&path);
            // SAFETY: the cache directory is private to Harbor (see `new`), its files are
            // written only by `compile_fresh` below, and the file name binds both the source
            // hash and this engine's compatibility hash.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(component) => return Ok(component),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "precompiled plugin unusable; compiling again")
                }
            }
        }
        let precompiled = self
            .engine
            .precompile_component(bytes)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        if let Err(e) = write_private(&path, &precompiled) {
            tracing::warn!(file = %path.display(), error = %e, "cannot cache a precompiled plugin");
        }
        prune(dir, DISK_CACHE_BYTES);
        // SAFETY: `precompiled` was produced by this engine a moment ago.
        unsafe { Component::deserialize(&self.engine, &precompiled) }
            .map_err(|e| anyhow::anyhow!("{e:#}"))
    }

    fn compile_fresh(&self, bytes: &[u8]) -> anyhow::Result<Component> {
        Component::new(&self.engine, bytes).map_err(|e| anyhow::anyhow!("{e:#}"))
    }

    fn cache_path(&self, dir: &Path, hash: &str) -> PathBuf {
        let mut compat = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut compat);
        dir.join(format!("{hash}-{:016x}.cwasm", compat.finish()))
    }
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn restrict(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot make the plugin cache private");
    }
}

/// Marks a cached file as just used.
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Removes the least recently used precompiled files until those left take at most `bound`
/// bytes.
fn prune(dir: &Path, bound: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((meta.modified().ok()?, meta.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= bound {
            break;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => total -= len,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot prune the plugin cache")
            }
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Several daemons may share a cache: each writes its own temp file, and rename is atomic.
    let tmp = path.with_extension(format!("tmp-{}-{}", std::process::id(), fastrand::u64(..)));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        // A full disk must not fill up further with halves of artefacts.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_cache_is_pruned_to_its_bound_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::time::SystemTime::now() - Duration::from_secs(100);
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            let path = dir.path().join(format!("{name}.cwasm"));
            std::fs::write(&path, vec![0u8; 1000]).unwrap();
            let file = std::fs::File::options().append(true).open(&path).unwrap();
            file.set_modified(base + Duration::from_secs(i as u64))
                .unwrap();
        }
        std::fs::write(dir.path().join("other.txt"), vec![0u8; 5000]).unwrap();
        // "a" is the oldest, but it was just used.
        touch(&dir.path().join("a.cwasm"));
        prune(dir.path(), 2500);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a.cwasm", "d.cwasm", "other.txt"]);
    }
}
