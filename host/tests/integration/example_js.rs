//! The JavaScript example strategy (`guest-strategies/example-js`) end to end: built with
//! componentize-js from npm, checked by `harbor plugin check`, uploaded, and routing requests.
//! Its npm packages are installed here when they are missing (`npm ci`); without npm the test
//! is skipped, except under `CI=true`, where it fails.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-strategies/example-js")
}

/// Runs `cmd`, failing the test with its output when it fails.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// The example built into `out`; none when npm is missing and not required.
fn build(out: &Path) -> Option<PathBuf> {
    let dir = example_dir();
    if !dir.join("node_modules/.bin/componentize-js").exists() {
        if Command::new("npm").arg("--version").output().is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "npm is missing; CI=true, so this test fails instead of skipping"
            );
            eprintln!("SKIPPED: npm is missing, so the JavaScript strategy cannot be built");
            return None;
        }
        run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir),
            "npm ci",
        );
    }
    let wasm = out.join("example-js.wasm");
    run(
        Command::new(dir.join("node_modules/.bin/componentize-js"))
            .args([
                "--wit",
                "../../wit/strategy",
                "--world-name",
                "plugin",
                "--out",
            ])
            .arg(&wasm)
            .arg("strategy.js")
            .current_dir(&dir),
        "componentize-js",
    );
    Some(wasm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_example_builds_passes_its_check_and_routes() {
    // Building and compiling a 12 MB component keeps both cores busy for half a minute.
    let _machine = common::MACHINE.write().await;
    let out = tempfile::tempdir().expect("a build directory");
    let Some(wasm) = tokio::task::spawn_blocking({
        let out = out.path().to_owned();
        move || build(&out)
    })
    .await
    .expect("the build") else {
        return;
    };
    let checked = run(
        Command::new(env!("CARGO_BIN_EXE_harbor"))
            .args(["plugin", "check"])
            .arg(&wasm),
        "harbor plugin check",
    );
    assert!(
        checked.starts_with("ok: strategy example-js 0.1.0"),
        "{checked}"
    );

    let h = common::start().await;
    let bytes = std::fs::read(&wasm).expect("the component");
    let resp = h
        .client
        .put(h.url("/api/v1/plugins/example-js?wait=true"))
        .header("content-type", "application/wasm")
        .body(bytes)
        .send()
        .await
        .expect("the API answers");
    assert_eq!(
        resp.status().as_u16(),
        201,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let upstreams = [
        common::proxies::Upstream::start("a").await,
        common::proxies::Upstream::start("b").await,
    ];
    for u in &upstreams {
        h.register(json!({"name": "js", "upstream": u.addr.to_string(), "host": "js.localhost", "strategy": "example-js", "ttl_secs": 60}))
            .await;
    }
    let proxy = h.harbor().proxy_addr().expect("the proxy");
    let client = reqwest::Client::new();
    // One request at a time: every backend is idle, so the strategy takes them in turn. Until a
    // picking thread's instance is made (a cold, busy machine takes seconds for this engine) the
    // host picks, so a round counts only when the JavaScript made every one of its picks.
    let served = common::eventually(
        Duration::from_secs(90),
        "ten picks by the JavaScript",
        || {
            let (client, h) = (client.clone(), &h);
            async move {
                let before = guest_picks(&h.metrics().await);
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..10 {
                    let (status, body) =
                        common::proxies::through(&client, proxy, "js.localhost", "/").await?;
                    assert_eq!(status, 200, "{body}");
                    seen.insert(body);
                }
                (guest_picks(&h.metrics().await) - before >= 10).then_some(seen)
            }
        },
    )
    .await;
    assert_eq!(served.into_iter().collect::<Vec<_>>(), ["a", "b"]);
    h.shutdown().await;
}

/// How many picks the JavaScript strategy has made.
fn guest_picks(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("harbor_plugin_pick_seconds_count{plugin=\"example-js\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}
