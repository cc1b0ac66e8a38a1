//! Static services from `.route` files: reading the directory, and following it live (inotify
//! through `notify`, debounced, with a periodic rescan as a fallback for file systems where
//! change events never arrive).

mod parse;

use std::path::Path;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use parse::parse_route;

use crate::dirwatch::DirWatch;
use crate::events::{Event, Follower, RouteFileError, Since};
use crate::model::{SETTINGS_FIELD, ServiceName, TlsMode};
use crate::registry::{Registry, RouteFile, SettingsCheck};

/// Route files larger than this are refused unread: a route is a few lines.
const MAX_FILE_BYTES: u64 = 256 * 1024;

/// Reads every `.route` file in `dir`. A directory that does not exist holds no routes; one that
/// cannot be read is an error, so that a passing permission problem does not remove every
/// static service.
pub fn scan(dir: &Path) -> std::io::Result<Option<Vec<RouteFile>>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(os_name) = path.file_name() else {
            continue;
        };
        let Some(file_name) = os_name.to_str() else {
            let raw = os_name.as_encoded_bytes();
            if raw.ends_with(b".route") && !raw.starts_with(b".") {
                files.push(unreadable_name(&path));
            }
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
    Ok(Some(files))
}

/// A `.route` file whose name is not UTF-8 cannot name a service: reported, not skipped.
fn unreadable_name(path: &Path) -> RouteFile {
    let file = path.display().to_string();
    RouteFile {
        name: None,
        file: file.clone(),
        parsed: Err(RouteFileError {
            file,
            line: None,
            column: None,
            field: Some("name".to_owned()),
            reason: "the file name is not valid UTF-8, so it names no service".to_owned(),
        }),
    }
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

/// Turns files whose strategy settings their strategy refuses into errors at the settings,
/// carrying the strategy's reason; the registry then keeps the file's last good version.
fn check_settings(files: &mut [RouteFile], check: &SettingsCheck) {
    for f in files {
        let Ok(parsed) = &f.parsed else {
            continue;
        };
        let route = &parsed.spec.route;
        if route.strategy_settings.is_empty() {
            continue;
        }
        if let Err(reason) = check(route.strategy.as_str(), &route.strategy_settings) {
            f.parsed = Err(parsed.error_at(&f.file, SETTINGS_FIELD, reason));
        }
    }
}

/// Turns files whose certificate files fail their check (missing, unreadable, a key that is
/// not the certificate's, a certificate out of its validity) into errors at `tls`.
fn check_certificates(files: &mut [RouteFile]) {
    for f in files {
        let Ok(parsed) = &f.parsed else {
            continue;
        };
        let Some(TlsMode::Files { cert, key }) = &parsed.spec.route.tls.mode else {
            continue;
        };
        if let Err(reason) = crate::tls::files::load(cert, key) {
            f.parsed = Err(parsed.error_at(&f.file, "tls", reason));
        }
    }
}

/// [`scan`], with each file's strategy settings put to its strategy (see [`check_settings`]).
pub fn scan_checked(
    dir: &Path,
    check: Option<&SettingsCheck>,
) -> std::io::Result<Option<Vec<RouteFile>>> {
    let mut files = scan(dir)?;
    if let Some(files) = &mut files {
        check_certificates(files);
        if let Some(check) = check {
            check_settings(files, check);
        }
    }
    Ok(files)
}

/// Scans `dir` and applies the result; a directory that cannot be read changes nothing.
pub async fn rescan(registry: &Registry, dir: &Path) {
    let owned = dir.to_owned();
    let check = registry.settings_check();
    match tokio::task::spawn_blocking(move || scan_checked(&owned, check.as_ref())).await {
        Ok(Ok(Some(files))) => registry.apply_routes(files),
        Ok(Ok(None)) => {
            tracing::warn!(dir = %dir.display(), "the routes directory does not exist; static services unchanged until it is back");
            registry.routes_dir_missing(&dir.display().to_string());
        }
        Ok(Err(e)) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot read the routes directory; static services unchanged")
        }
        Err(e) => tracing::error!(error = %e, "route scan failed"),
    }
}

/// Re-reads the routes directory whenever a strategy is loaded or removed, from event `cursor`
/// on: a route file that names a plugin uploaded after it was written routes at once, rather
/// than at the next periodic rescan.
pub async fn follow_strategies(
    registry: Arc<Registry>,
    trigger: Arc<Notify>,
    cursor: u64,
    cancel: CancellationToken,
) {
    let mut events = Follower::new(registry.bus().clone(), cursor);
    while let Some(since) = events.next(&cancel).await {
        let changed = match since {
            Since::Events(events) => events.iter().any(|e| {
                matches!(
                    e.event,
                    Event::PluginLoaded { .. } | Event::PluginRemoved { .. }
                )
            }),
            Since::Gap => true,
        };
        if changed {
            trigger.notify_one();
        }
    }
}

/// Follows the routes directory until cancelled; `trigger` forces a re-read (SIGHUP).
pub async fn follow(
    watch: DirWatch,
    registry: Arc<Registry>,
    trigger: Arc<Notify>,
    cancel: CancellationToken,
) {
    let dir = watch.dir().to_owned();
    watch.run(trigger, cancel, || rescan(&registry, &dir)).await;
}
