//! Static services from `.route` files: reading the directory, and following it live (inotify
//! through `notify`, debounced, with a periodic rescan as a fallback for file systems where
//! change events never arrive).

mod parse;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use parse::parse_route;

use crate::events::RouteFileError;
use crate::model::ServiceName;
use crate::registry::{Registry, RouteFile};

/// Route files larger than this are refused unread: a route is a few lines.
const MAX_FILE_BYTES: u64 = 256 * 1024;
/// Editors write a burst of events for one save; wait for this much quiet before reading.
const QUIET: Duration = Duration::from_millis(50);
/// ...but never longer than this after the first event.
const MAX_DELAY: Duration = Duration::from_millis(300);

/// Reads every `.route` file in `dir`. A directory that does not exist holds no routes; one that
/// cannot be read is an error, so that a passing permission problem does not remove every
/// static service.
pub fn scan(dir: &Path) -> std::io::Result<Vec<RouteFile>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // Dot-files are editor and tool droppings (.#x.route, .x.route.swp).
        let Some(stem) = file_name
            .strip_suffix(".route")
            .filter(|_| !file_name.starts_with('.'))
        else {
            continue;
        };
        files.push(read_route_file(&path, stem));
    }
    files.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(files)
}

fn read_route_file(path: &Path, stem: &str) -> RouteFile {
    let file = path.display().to_string();
    let error = |field: Option<&str>, reason: String| RouteFileError {
        file: file.clone(),
        line: None,
        column: None,
        field: field.map(str::to_owned),
        reason,
    };
    let name = match ServiceName::parse(stem) {
        Ok(name) => name,
        Err(e) => {
            return RouteFile {
                name: None,
                parsed: Err(error(
                    Some("name"),
                    format!("the file name gives the service name: {}", e.reason),
                )),
                file,
            };
        }
    };
    let parsed = read_text(path)
        .map_err(|reason| error(None, reason))
        .and_then(|text| parse_route(&file, &name, &text));
    RouteFile {
        file,
        name: Some(name),
        parsed,
    }
}

fn read_text(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "file is {} bytes; a route file may be at most {MAX_FILE_BYTES}",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    String::from_utf8(bytes).map_err(|_| "file is not UTF-8 text".to_owned())
}

/// Scans `dir` and applies the result; a directory that cannot be read changes nothing.
pub async fn rescan(registry: &Registry, dir: &Path) {
    let owned = dir.to_owned();
    match tokio::task::spawn_blocking(move || scan(&owned)).await {
        Ok(Ok(files)) => registry.apply_routes(files),
        Ok(Err(e)) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot read the routes directory; static services unchanged")
        }
        Err(e) => tracing::error!(error = %e, "route scan failed"),
    }
}

#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Follow change events from the file system.
    pub notify: bool,
    /// Rescan this often even without events.
    pub rescan_every: Option<Duration>,
}

/// Follows the routes directory. Created before the first scan, so that no change made after
/// the daemon has started can slip between that scan and the watch.
pub struct Follower {
    dir: PathBuf,
    options: WatchOptions,
    kick: Arc<Notify>,
    watcher: Option<notify::RecommendedWatcher>,
}

impl Follower {
    pub fn new(dir: PathBuf, options: WatchOptions) -> Self {
        let mut follower = Self {
            dir,
            options,
            kick: Arc::new(Notify::new()),
            watcher: None,
        };
        follower.arm();
        follower
    }

    /// Starts watching if asked to and not yet watching (the directory may appear later).
    fn arm(&mut self) {
        if self.options.notify && self.watcher.is_none() {
            self.watcher = start_watcher(&self.dir, self.kick.clone());
        }
    }

    /// Applies changes until cancelled. `trigger` forces a full re-read (SIGHUP).
    pub async fn run(
        mut self,
        registry: Arc<Registry>,
        trigger: Arc<Notify>,
        cancel: CancellationToken,
    ) {
        let mut ticker = self.options.rescan_every.map(|every| {
            let mut t = tokio::time::interval_at(Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            let tick = async {
                match ticker.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.kick.notified() => settle(&self.kick).await,
                () = trigger.notified() => tracing::info!(dir = %self.dir.display(), "re-reading routes"),
                () = tick => self.arm(),
            }
            rescan(&registry, &self.dir).await;
        }
    }
}

/// Waits until change events have been quiet for a moment, or the maximum delay has passed.
async fn settle(kick: &Notify) {
    let deadline = Instant::now() + MAX_DELAY;
    loop {
        let quiet_until = (Instant::now() + QUIET).min(deadline);
        tokio::select! {
            () = tokio::time::sleep_until(quiet_until) => return,
            () = kick.notified() => {}
        }
    }
}

fn start_watcher(dir: &Path, kick: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    let handler = move |res: notify::Result<notify::Event>| match res {
        // Reading the files ourselves produces access events; they must not trigger a rescan.
        Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
        Ok(_) => kick.notify_one(),
        Err(e) => tracing::warn!(error = %e, "route directory watch error"),
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the routes directory; relying on periodic rescans");
            return None;
        }
    };
    match watcher.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the routes directory yet; will retry at the next rescan");
            None
        }
    }
}
