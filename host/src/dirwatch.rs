//! Following a directory: inotify through `notify`, debounced so that an editor's burst of
//! events for one save becomes one re-read, with a periodic rescan for file systems that never
//! deliver events (some bind mounts and network file systems). Used for `.route` files and for
//! plugins.
//!
//! A watch holds the directory it was armed on, not its path: deleted and created again, or a
//! symlink whose target is swapped, would leave it watching nothing. So the parent directory is
//! watched too, for the directory's own name; when that entry changes, the watch is armed again
//! on whatever the path now names, and the directory is read.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Wait for this much quiet after a change event before reading...
const QUIET: Duration = Duration::from_millis(50);
/// ...but never longer than this after the first event.
const MAX_DELAY: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Follow change events from the file system.
    pub notify: bool,
    /// Re-read this often even without events.
    pub rescan_every: Option<Duration>,
}

/// A watch on one directory. Created before the first read, so that no change made after the
/// daemon has started can slip between that read and the watch.
pub struct DirWatch {
    dir: PathBuf,
    options: WatchOptions,
    kick: Arc<Notify>,
    /// Told when the directory's entry in its parent changed: the watch must be armed again.
    moved: Arc<Notify>,
    watcher: Option<notify::RecommendedWatcher>,
}

impl DirWatch {
    pub fn new(dir: PathBuf, options: WatchOptions) -> Self {
        let mut watch = Self {
            dir,
            options,
            kick: Arc::new(Notify::new()),
            moved: Arc::new(Notify::new()),
            watcher: None,
        };
        watch.arm();
        watch
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts watching if asked to and not yet watching (the directory may appear later).
    fn arm(&mut self) {
        if self.options.notify && self.watcher.is_none() {
            self.watcher = start_watcher(&self.dir, self.kick.clone(), self.moved.clone());
        }
    }

    /// Arms the watch again on what the path names now.
    fn rearm(&mut self) {
        self.watcher = None;
        self.arm();
    }

    /// Calls `reread` after each settled change, each rescan period and each `trigger`, until
    /// cancelled.
    pub async fn run<F, Fut>(
        mut self,
        trigger: Arc<Notify>,
        cancel: CancellationToken,
        mut reread: F,
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
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
                () = self.moved.notified() => {
                    tracing::info!(dir = %self.dir.display(), "the directory was replaced; following it again");
                    settle(&self.kick).await;
                    self.rearm();
                }
                () = trigger.notified() => tracing::info!(dir = %self.dir.display(), "re-reading"),
                () = tick => self.arm(),
            }
            reread().await;
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

fn start_watcher(
    dir: &Path,
    kick: Arc<Notify>,
    moved: Arc<Notify>,
) -> Option<notify::RecommendedWatcher> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    let parent = dir.parent().map(Path::to_owned);
    let own_entry = dir.clone();
    let handler = move |res: notify::Result<notify::Event>| match res {
        // Reading the files ourselves produces access events; they must not trigger a re-read.
        Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
        Ok(event) => {
            if event.paths.contains(&own_entry) {
                moved.notify_one();
            } else if event.paths.iter().any(|p| p.starts_with(&own_entry)) {
                kick.notify_one();
            }
            // Anything else happened beside the directory, in its parent: not ours.
        }
        Err(e) => tracing::warn!(error = %e, "directory watch error"),
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch directories; relying on periodic rescans");
            return None;
        }
    };
    if let Some(parent) = &parent
        && let Err(e) = watcher.watch(parent, RecursiveMode::NonRecursive)
    {
        tracing::warn!(dir = %parent.display(), error = %e, "cannot watch the parent directory; a replaced directory is followed again at the next rescan");
    }
    match watcher.watch(&dir, RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        // The directory may come later: the parent's watch tells when.
        Err(e) if parent.is_some() => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the directory yet; waiting for it to appear");
            Some(watcher)
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the directory yet; will retry at the next rescan");
            None
        }
    }
}
