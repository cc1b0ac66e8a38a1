//! The JavaScript example strategy (`guest-strategies/example-js`) end to end: built with
//! componentize-js from npm, checked by `harbor plugin check`, uploaded, and routing requests.
//! Its npm packages are installed here when they are missing (`npm ci`); without npm the test
//! is skipped, except under `CI=true`, where it fails.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::examples::{Example, run};

const EXAMPLE: Example = Example {
    name: "example-js",
    language: "JavaScript",
    service: "js",
    upload_within: None,
    // A cold, busy machine takes seconds to make an instance of this engine.
    picks_within: Duration::from_secs(90),
};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-strategies/example-js")
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
    let Some((h, _upstreams)) = EXAMPLE.routing(out.path(), build).await else {
        return;
    };
    // Every backend is idle, so the strategy takes them in turn.
    let served: BTreeSet<String> = EXAMPLE.ten_guest_picks(&h).await.into_iter().collect();
    assert_eq!(served.into_iter().collect::<Vec<_>>(), ["a", "b"]);
    h.shutdown().await;
}
