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

use common::examples::{Example, run, try_run};

const NAME: &str = "example-py";

const EXAMPLE: Example = Example {
    name: NAME,
    language: "Python",
    service: "py",
    // No limits in the upload's query: componentize-py's 14 core instances and 12 MiB of memory
    // fit the defaults. Compiling it takes about 20 s in a debug build.
    upload_within: Some(Duration::from_secs(120)),
    // A cold, busy machine takes seconds to make an instance of this runtime.
    picks_within: Duration::from_secs(120),
};

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
    let Some((h, _upstreams)) = EXAMPLE.routing(out.path(), build).await else {
        return;
    };
    // Round-robin by the pick's sequence: one request at a time, so the picks alternate.
    let served = EXAMPLE.ten_guest_picks(&h).await;
    assert!(
        served.windows(2).all(|w| w[0] != w[1]),
        "the picks do not alternate: {served:?}"
    );
    let mut backends = served;
    backends.sort();
    backends.dedup();
    assert_eq!(backends, ["a", "b"]);

    let p = EXAMPLE.listed(&h).await;
    assert_eq!(p["state"], "active", "{p}");
    assert_eq!(p["faults"], 0, "{p}");
    assert_eq!(p["limits"]["instances"], 32, "the default: {p}");
    assert_eq!(p["limits"]["memory_bytes"], 32 << 20, "the default: {p}");
    h.shutdown().await;
}
