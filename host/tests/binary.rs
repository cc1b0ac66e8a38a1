//! The `harbor` binary as a user runs it: with the contrib examples, re-reading on SIGHUP,
//! stopping cleanly on SIGTERM, refusing bad flags with a clear message.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::eventually;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_harbor");

fn contrib_routes() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/routes.d")
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The daemon process, killed if a failing test leaves it running.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the binary and returns it with the API address it logged.
fn spawn(args: &[&str]) -> (Daemon, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn harbor");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = strip_ansi(&line);
            if let Some(addr) = line
                .contains("API listening")
                .then(|| line.split("addr=").nth(1))
                .flatten()
            {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("harbor logs its API address");
    (Daemon(child), format!("http://{addr}"))
}

fn signal(daemon: &Daemon, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &daemon.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn services(client: &reqwest::Client, base: &str) -> Vec<Value> {
    let body: Value = client
        .get(format!("{base}/api/v1/services"))
        .send()
        .await
        .expect("GET services")
        .json()
        .await
        .expect("JSON");
    body["services"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn runs_the_contrib_examples_rereads_on_sighup_and_stops_on_sigterm() {
    let routes = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(contrib_routes()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, routes.path().join(path.file_name().unwrap())).unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let (mut child, base) = spawn(&[
        "--routes",
        routes.path().to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
        "--api",
        "127.0.0.1:0",
        "--no-watch",
        "--rescan-interval",
        "0",
    ]);
    let client = reqwest::Client::new();
    let names: Vec<_> = services(&client, &base)
        .await
        .iter()
        .map(|s| s["name"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(names, ["grafana", "postgres", "whoami"]);
    let errors: Value = client
        .get(format!("{base}/api/v1/route-errors"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        errors["errors"],
        Value::Array(vec![]),
        "the examples are valid"
    );

    common::write_atomically(
        &routes.path().join("whoami.route"),
        "host = \"whoami.localhost\"\nupstreams = [\"127.0.0.1:9009\"]\npublic = true\n",
    );
    signal(&child, "-HUP");
    eventually(Duration::from_secs(2), "SIGHUP re-read", || async {
        let svcs = services(&client, &base).await;
        let whoami = svcs.iter().find(|s| s["name"] == "whoami")?;
        (whoami["upstreams"][0]["addr"] == "127.0.0.1:9009").then_some(())
    })
    .await;

    signal(&child, "-TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit within 5 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "{status}");
}

#[test]
fn bad_flags_are_refused_with_a_reason() {
    let out = Command::new(BIN)
        .args(["--ttl-min", "10s", "--ttl-max", "5s"])
        .output()
        .expect("run harbor");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ttl-min"), "{stderr}");

    let out = Command::new(BIN)
        .args(["--api", "nowhere"])
        .output()
        .expect("run harbor");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere"));
}

#[test]
fn plugin_check_runs_the_admission_check_offline() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("canary.wasm");
    std::fs::write(
        &good,
        common::guests::component("strategy-example-canary", &[]),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["plugin", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("ok: strategy example-canary"),
        "{stdout}"
    );

    let bad = dir.path().join("bad.wasm");
    std::fs::write(
        &bad,
        common::guests::component("harbor-test-wrong-version", &[]),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["plugin", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("harbor:strategy@0.1.0"), "{stderr}");
}

#[test]
fn help_names_every_environment_variable() {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run harbor");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "HARBOR_ROUTES",
        "HARBOR_STATE_DIR",
        "HARBOR_API",
        "HARBOR_BACKEND",
        "HARBOR_TOKEN_FILE",
        "HARBOR_CONFIG",
    ] {
        assert!(help.contains(var), "--help does not mention {var}");
    }
}
