//! The version of the Caddy behind an admin address. Caddy's admin API does not report its
//! version, but it names the binary it runs (`/debug/vars`, its command line), and that binary
//! reports it (`caddy version`). Harbor drives one host's proxy, so that binary is on this host;
//! when it is not (Caddy in a container), the version stays unknown and the adapter writes only
//! what every supported Caddy understands.

use std::path::PathBuf;
use std::time::Duration;

use super::http::{BaseUrl, BoundHttp};

/// Longest the admin API and `caddy version` may take each.
const DEADLINE: Duration = Duration::from_secs(3);

/// Caddy's version as it reports it (`v2.11.7 h1:…`, `2.6.2`), or why it cannot be told.
pub async fn version(admin: &BaseUrl) -> Result<String, String> {
    let admin = admin.clone();
    let binary = tokio::task::spawn_blocking(move || binary(&admin))
        .await
        .map_err(|e| e.to_string())??;
    let output = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(&binary)
            .arg("version")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("{} version did not answer in time", binary.display()))?
    .map_err(|e| format!("cannot run {} version: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.lines().next().unwrap_or_default().trim();
    let looks_like_one = version
        .trim_start_matches('v')
        .starts_with(|c: char| c.is_ascii_digit());
    if !output.status.success() || !looks_like_one {
        return Err(format!(
            "{} version answered {:?}",
            binary.display(),
            text.trim()
        ));
    }
    Ok(version.to_owned())
}

/// The binary Caddy's admin API says it runs.
fn binary(admin: &BaseUrl) -> Result<PathBuf, String> {
    let mut http = BoundHttp::new(admin.clone(), DEADLINE).map_err(|e| e.to_string())?;
    let vars = http
        .send("GET", "/debug/vars", &[], Vec::new())
        .map_err(|e| format!("Caddy's admin API: {e}"))?;
    if vars.status != 200 {
        return Err(format!("Caddy's /debug/vars answered {}", vars.status));
    }
    let vars: serde_json::Value =
        serde_json::from_slice(&vars.body).map_err(|e| format!("Caddy's /debug/vars: {e}"))?;
    let path = PathBuf::from(vars["cmdline"][0].as_str().unwrap_or_default());
    // Only an absolute path to a program named like Caddy is run: what the admin API names,
    // Harbor executes.
    let named_caddy = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("caddy"));
    if !path.is_absolute() || !named_caddy || !path.is_file() {
        return Err(format!(
            "Caddy runs {}, which is not a Caddy binary on this host",
            path.display()
        ));
    }
    Ok(path)
}
