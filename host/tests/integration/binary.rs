//! The `harbor` binary as a user runs it: with the contrib examples, re-reading on SIGHUP,
//! stopping cleanly on SIGTERM, refusing bad flags with a clear message.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Daemon, eventually};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_harbor");

fn contrib_routes() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/routes.d")
}

/// Starts the binary and returns it with the API address it logged, and the HTTP proxy's.
fn spawn(args: &[&str]) -> (Daemon, String, String) {
    Daemon::spawn(BIN, args)
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
    // As the README runs it, with the demo echo backends on the ports the examples name.
    let (mut child, base, proxy) = spawn(&[
        "--routes",
        routes.path().to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
        "--api",
        "127.0.0.1:0",
        "--proxy-listen",
        "127.0.0.1:0",
        "--echo",
        "127.0.0.1:9001,127.0.0.1:9002",
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
    assert_eq!(names, ["echo-tcp", "grafana", "postgres", "whoami"]);

    // Traffic spreads 1:2 over the two echo backends, as whoami.route says.
    let mut served = std::collections::BTreeMap::new();
    for _ in 0..30 {
        let body = client
            .get(&proxy)
            .header("host", "whoami.localhost")
            .send()
            .await
            .expect("through the proxy")
            .text()
            .await
            .expect("body");
        let by = body.lines().next().unwrap_or("").to_owned();
        *served.entry(by).or_insert(0) += 1;
    }
    assert_eq!(
        served.into_iter().collect::<Vec<_>>(),
        [
            ("served by 127.0.0.1:9001".to_owned(), 10),
            ("served by 127.0.0.1:9002".to_owned(), 20)
        ]
    );
    // And the tcp example echoes.
    let mut tcp = eventually(
        Duration::from_secs(5),
        "the tcp example to listen",
        || async { tokio::net::TcpStream::connect("127.0.0.1:7001").await.ok() },
    )
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"hello harbor\n").await.expect("write");
    tcp.shutdown().await.expect("half-close");
    let mut echoed = String::new();
    tcp.read_to_string(&mut echoed).await.expect("read");
    assert_eq!(echoed, "hello harbor\n");
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
    assert!(stderr.contains("harbor:strategy@0.5.0"), "{stderr}");
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

/// Executable mappings and resident memory of process `pid`.
fn code_and_rss(pid: u32) -> (usize, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    // Compiled guest code is mapped anonymously; the binary's own code has its path.
    let code = maps
        .lines()
        .filter(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.get(1).is_some_and(|p| p.starts_with("r-x")) && fields.len() < 6
        })
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS");
    (code, rss_kib << 10)
}

/// Upload-and-delete cycles of ever new components, each serving traffic before it goes, leave
/// no compiled code behind: the daemon's executable mappings stay as many as after the first
/// cycles, whatever the number of cycles, and so does its memory within a few instances' worth.
#[tokio::test]
async fn upload_and_delete_cycles_leave_no_compiled_code_mapped() {
    let state = tempfile::tempdir().unwrap();
    let routes = tempfile::tempdir().unwrap();
    let web = common::proxies::Upstream::start("web").await;
    // Named before the plugin is loaded: each upload makes the route serve, at once.
    std::fs::write(
        routes.path().join("canary.route"),
        format!(
            "host = \"canary.localhost\"\nstrategy = \"example-canary\"\nupstreams = [\"{}\"]\n",
            web.addr
        ),
    )
    .unwrap();
    let (child, base, proxy) = spawn(&[
        "--routes",
        routes.path().to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
        "--api",
        "127.0.0.1:0",
        "--proxy-listen",
        "127.0.0.1:0",
    ]);
    let pid = child.0.id();
    let client = reqwest::Client::new();
    let canary = common::guests::component("strategy-example-canary", &[]);
    let cycle = |n: u32| {
        let (client, base, proxy) = (client.clone(), base.clone(), proxy.clone());
        let bytes = common::guests::variant(&canary, 5000 + n);
        async move {
            let put = client
                .put(format!("{base}/api/v1/plugins/example-canary?wait=true"))
                .header("content-type", "application/wasm")
                .body(bytes)
                .send()
                .await
                .expect("upload");
            assert_eq!(put.status().as_u16(), 201, "cycle {n}");
            // Until the plugin's instances answer every pick of a round, each round on fresh
            // connections so that the proxy's threads share them.
            let fell_back = || async {
                let metrics = client
                    .get(format!("{base}/metrics"))
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                let line = "harbor_plugin_fallback_picks_total{plugin=\"example-canary\"} ";
                Some(
                    metrics
                        .lines()
                        .find_map(|l| l.strip_prefix(line))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0),
                )
            };
            let picked = || async {
                let before = fell_back().await?;
                for _ in 0..8 {
                    let answer = reqwest::Client::new()
                        .get(&proxy)
                        .header("host", "canary.localhost")
                        .send()
                        .await
                        .ok()?;
                    (answer.status() == 200).then_some(())?;
                }
                (fell_back().await? == before).then_some(())
            };
            eventually(Duration::from_secs(20), "the plugin picking", picked).await;
            let delete = client
                .delete(format!("{base}/api/v1/plugins/example-canary"))
                .send()
                .await
                .expect("delete");
            assert_eq!(delete.status().as_u16(), 204, "cycle {n}");
            // The next request after the delete is where a thread lets go of the old one.
            for _ in 0..8 {
                let _ = reqwest::Client::new()
                    .get(&proxy)
                    .header("host", "canary.localhost")
                    .send()
                    .await;
            }
        }
    };
    let stores = || async {
        let metrics = reqwest::get(format!("{base}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("harbor_plugin_stores "))
            .and_then(|v| v.parse::<i64>().ok())
            .expect("harbor_plugin_stores")
    };
    let (code_at_start, _) = code_and_rss(pid);
    let stores_at_start = stores().await;
    for n in 0..5 {
        cycle(n).await;
    }
    let (code_before, rss_before) = code_and_rss(pid);
    for n in 5..45 {
        cycle(n).await;
    }
    let (code_after, rss_after) = code_and_rss(pid);
    eprintln!(
        "at start {code_at_start} code mappings; after 5 cycles: {code_before}, {} MiB resident; after 45: {code_after}, {} MiB",
        rss_before >> 20,
        rss_after >> 20
    );
    // Once deleted, and each picking thread has picked again, no instance of it is left.
    assert_eq!(
        stores().await,
        stores_at_start,
        "instances of deleted plugins are still alive"
    );
    // Forty more compiled components, had they stayed, would be forty more mappings.
    assert!(
        code_after <= code_before + 2,
        "code mappings grew from {code_before} to {code_after}"
    );
    let cached = std::fs::read_dir(state.path().join("plugin-cache"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(cached > 0, "the precompiled components are cached on disk");
    drop(child);
}
