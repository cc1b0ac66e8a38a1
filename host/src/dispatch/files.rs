//! The adapter-file follower: `backend-*.wasm` files in the plugins directory swapped in as
//! they appear or change, and the built-in adapter swapped back when the one in force goes.

use std::sync::{Arc, Mutex};

use crate::events::lock;

use super::Dispatcher;

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
        match dispatcher.builtin_spec(dispatcher.kind(), None).await {
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
        let spec = match dispatcher
            .spec_for(dispatcher.kind(), bytes.into(), source.clone(), None)
            .await
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
