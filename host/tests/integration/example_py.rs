//! The Python example strategy (`guest-strategies/example-py`) end to end: built with
//! componentize-py, checked by `harbor plugin check`, uploaded with the default limits, and
//! routing requests. componentize-py is taken from PATH; when it is not there, the version pinned
//! in the example's `requirements.txt` is installed into a virtual environment under the target
//! directory (`target/example-py/venv`). Without Python, or when that install fails, the test is
//! skipped, except under `CI=true`, where it fails.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

const NAME: &str = "example-py";

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-strategies/example-py")
}

/// `target/example-py`: the target directory is the one that holds the `harbor` binary's
/// profile directory.
fn work_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_harbor"))
        .ancestors()
        .nth(2)
        .expect("the target directory")
        .join(NAME)
}

/// Runs `cmd`, failing the test with its output when it fails.
fn run(cmd: &mut Command, what: &str) -> String {
    try_run(cmd, what).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `cmd`: its output, or why it did not succeed.
fn try_run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{what} failed:\n{text}"))
    }
}

/// The componentize-py version that `requirements.txt` pins.
fn pinned_version() -> String {
    let requirements =
        std::fs::read_to_string(example_dir().join("requirements.txt")).expect("requirements.txt");
    requirements
        .lines()
        .find_map(|l| l.trim().strip_prefix("componentize-py=="))
        .expect("requirements.txt pins componentize-py")
        .trim()
        .to_owned()
}

/// componentize-py: from PATH, or the pinned version in the virtual environment under the
/// target directory, installing it there first if needed.
fn componentize_py() -> Result<PathBuf, String> {
    let on_path = PathBuf::from("componentize-py");
    if try_run(Command::new(&on_path).arg("--version"), "componentize-py").is_ok() {
        return Ok(on_path);
    }
    let venv = work_dir().join("venv");
    let tool = venv.join("bin/componentize-py");
    let pinned = format!("componentize-py {}", pinned_version());
    if try_run(Command::new(&tool).arg("--version"), "componentize-py")
        .is_ok_and(|v| v.trim() == pinned)
    {
        return Ok(tool);
    }
    std::fs::create_dir_all(work_dir()).expect("the work directory");
    try_run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    )?;
    try_run(
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(example_dir().join("requirements.txt")),
        "pip install -r requirements.txt",
    )?;
    Ok(tool)
}

/// The example built into `out`; none when componentize-py is missing, cannot be installed and
/// is not required.
fn build(out: &Path) -> Option<PathBuf> {
    let tool = match componentize_py() {
        Ok(tool) => tool,
        Err(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "componentize-py is missing and cannot be installed; CI=true, so this test \
                 fails instead of skipping: {why}"
            );
            eprintln!("SKIPPED: componentize-py is missing and cannot be installed: {why}");
            return None;
        }
    };
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit/strategy");
    let bindings = out.join("bindings");
    run(
        Command::new(&tool)
            .arg("-d")
            .arg(&wit)
            .args(["-w", "plugin", "bindings"])
            .arg(&bindings),
        "componentize-py bindings",
    );
    // The app from a copy, because componentize-py leaves `__pycache__` beside it.
    let app = out.join("app");
    std::fs::create_dir_all(&app).expect("the app directory");
    std::fs::copy(example_dir().join("app.py"), app.join("app.py")).expect("app.py");
    let wasm = out.join(format!("{NAME}.wasm"));
    run(
        Command::new(&tool)
            .arg("-d")
            .arg(&wit)
            .args(["-w", "plugin", "componentize", "-p"])
            .arg(&app)
            .arg("-p")
            .arg(&bindings)
            .args(["app", "-o"])
            .arg(&wasm),
        "componentize-py componentize",
    );
    Some(wasm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_builds_and_routes_under_the_default_limits() {
    // Building and compiling an 18 MB component keeps both cores busy for half a minute.
    let _machine = common::MACHINE.write().await;
    std::fs::create_dir_all(work_dir()).expect("the work directory");
    // A directory of this run's own, so that concurrent runs sharing the target directory do not
    // build over each other.
    let out = tempfile::tempdir_in(work_dir()).expect("a build directory");
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
        checked.starts_with("ok: strategy example-py 0.1.0"),
        "{checked}"
    );

    let h = common::start().await;
    let bytes = std::fs::read(&wasm).expect("the component");
    // No limits in the query: componentize-py's 14 core instances and 12 MiB of memory fit the
    // defaults. Compiling it takes about 20 s in a debug build.
    let resp = tokio::time::timeout(
        Duration::from_secs(120),
        h.client
            .put(h.url("/api/v1/plugins/example-py?wait=true"))
            .header("content-type", "application/wasm")
            .body(bytes)
            .send(),
    )
    .await
    .expect("the upload is checked within 120 s")
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
        h.register(json!({"name": "py", "upstream": u.addr.to_string(), "host": "py.localhost", "strategy": NAME, "ttl_secs": 60}))
            .await;
    }
    let proxy = h.harbor().proxy_addr().expect("the proxy");
    let client = reqwest::Client::new();
    // Round-robin by the pick's sequence: one request at a time, so the picks alternate. Until a
    // picking thread's instance is made (seconds for this runtime on a cold, busy machine) the
    // host picks, so a round counts only when the Python made every one of its picks.
    let served = common::eventually(Duration::from_secs(120), "ten picks by the Python", || {
        let (client, h) = (client.clone(), &h);
        async move {
            let before = guest_picks(&h.metrics().await);
            let mut seen = Vec::new();
            for _ in 0..10 {
                let (status, body) =
                    common::proxies::through(&client, proxy, "py.localhost", "/").await?;
                assert_eq!(status, 200, "{body}");
                seen.push(body);
            }
            (guest_picks(&h.metrics().await) - before >= 10).then_some(seen)
        }
    })
    .await;
    assert!(
        served.windows(2).all(|w| w[0] != w[1]),
        "the picks do not alternate: {served:?}"
    );
    let mut backends = served;
    backends.sort();
    backends.dedup();
    assert_eq!(backends, ["a", "b"]);

    let (status, list) = h.get("/api/v1/plugins").await;
    assert_eq!(status, 200);
    let p = plugin(&list, NAME).unwrap_or_else(|| panic!("{NAME} not listed: {list}"));
    assert_eq!(p["state"], "active", "{p}");
    assert_eq!(p["faults"], 0, "{p}");
    assert_eq!(p["limits"]["instances"], 32, "the default: {p}");
    assert_eq!(p["limits"]["memory_bytes"], 32 << 20, "the default: {p}");
    h.shutdown().await;
}

fn plugin<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

/// How many picks the Python strategy has made.
fn guest_picks(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("harbor_plugin_pick_seconds_count{plugin=\"example-py\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}
