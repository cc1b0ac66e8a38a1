//! Custom strategies from the plugin directory: every `*.wasm` file is checked and, if it
//! passes, put in force under the name it describes; a changed file is checked again (the old
//! version serves until the new one passes); a removed file takes its strategy out of force.
//! A `NAME.toml` beside `NAME.wasm` sets the plugin's limits and settings; a change to it checks the plugin
//! again under the new ones. Files named `backend-*.wasm` are backend adapters, which the
//! dispatcher loads instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::catalog::Strategies;
use super::engine::content_hash;
use super::limits::SidecarText;
use super::strategy::Source;

/// The file name prefix of backend adapters in the plugin directory.
pub const ADAPTER_PREFIX: &str = "backend-";

/// Components larger than this are refused unread.
pub const MAX_COMPONENT_BYTES: u64 = 32 << 20;

/// What the directory held at the last scan: path → content hash (with its sidecar's).
#[derive(Default)]
pub struct DirState {
    seen: HashMap<PathBuf, String>,
}

/// Applies the directory's current contents. Runs blocking file reads and compiles: call it
/// from a blocking thread.
pub fn scan(strategies: &Strategies, dir: &Path, state: &mut DirState) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return forget_missing(strategies, state, &[]);
        }
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot read the plugin directory; plugins unchanged");
            return;
        }
    };
    let mut present = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !file_name.ends_with(".wasm") || file_name.starts_with('.') {
            continue;
        }
        if file_name.starts_with(ADAPTER_PREFIX) {
            continue;
        }
        present.push(path.clone());
        let source = Source::File(path.display().to_string());
        let bytes = match read(&path) {
            Ok(bytes) => bytes,
            Err(reason) => {
                // Reported once per version of the file, as a failed check is.
                let unchanged = std::fs::metadata(&path)
                    .map(|m| format!("unreadable:{}:{:?}", m.len(), m.modified().ok()))
                    .unwrap_or_default();
                if state.seen.get(&path) != Some(&unchanged) {
                    state.seen.insert(path.clone(), unchanged);
                    strategies.refuse(source, None, &reason);
                }
                continue;
            }
        };
        let sidecar = SidecarText::read(&path);
        let hash = format!(
            "{}+{}",
            content_hash(&bytes),
            content_hash(sidecar.fingerprint())
        );
        if state.seen.get(&path) == Some(&hash) {
            continue;
        }
        state.seen.insert(path.clone(), hash);
        // A rejection is reported by the catalog (log, event, API); the old version keeps
        // serving and the file is checked again when it or its sidecar changes.
        match sidecar.setup() {
            Ok(setup) => {
                let _ = strategies.install(&bytes, source, None, setup);
            }
            Err(reason) => strategies.refuse(source, None, &reason),
        }
    }
    forget_missing(strategies, state, &present);
}

fn forget_missing(strategies: &Strategies, state: &mut DirState, present: &[PathBuf]) {
    let gone: Vec<PathBuf> = state
        .seen
        .keys()
        .filter(|p| !present.contains(p))
        .cloned()
        .collect();
    for path in gone {
        state.seen.remove(&path);
        let source = Source::File(path.display().to_string());
        if let Some(name) = strategies.name_from(&source) {
            strategies.remove(&name);
        }
    }
}

pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_COMPONENT_BYTES {
        return Err(format!(
            "the file is {} bytes; a plugin may be at most {MAX_COMPONENT_BYTES} bytes (32 MiB)",
            meta.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read: {e}"))
}

/// Scans on a blocking thread, keeping the state between scans.
pub async fn rescan(
    strategies: &Arc<Strategies>,
    dir: &Path,
    state: &Arc<std::sync::Mutex<DirState>>,
) {
    let (strategies, dir, state) = (strategies.clone(), dir.to_owned(), state.clone());
    let done = tokio::task::spawn_blocking(move || {
        let mut state = crate::events::lock(&state);
        scan(&strategies, &dir, &mut state);
    })
    .await;
    if let Err(e) = done {
        tracing::error!(error = %e, "plugin directory scan failed");
    }
}
