//! Registrations survive what a host does to a daemon: `kill -9` in the middle of a storm of
//! registrations, renewals and deregistrations loses nothing that was acknowledged and brings
//! back nothing acknowledged as removed; a full disk turns changes into `503`s that say why,
//! and Harbor recovers once there is room; and a second daemon cannot share a state directory.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Daemon, eventually};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_harbor");

/// What a client knows of one instance (one upstream, owned by one worker).
#[derive(Debug, Clone, PartialEq)]
enum Known {
    /// Acknowledged live, with the lease's end as last acknowledged.
    Live { id: String, expires_at: String },
    /// Acknowledged removed.
    Removed,
    /// A request was in flight when the daemon was killed: either outcome is allowed.
    Unknown {
        id: Option<String>,
        live_expires_at: Option<String>,
    },
}

type Model = Arc<Mutex<BTreeMap<String, Known>>>;

fn daemon(state: &Path, routes: &Path) -> (Daemon, String) {
    let (d, api, _) = Daemon::spawn(
        BIN,
        &[
            "--api",
            "127.0.0.1:0",
            "--proxy-listen",
            "127.0.0.1:0",
            "--state-dir",
            &state.to_string_lossy(),
            "--routes",
            &routes.to_string_lossy(),
        ],
    );
    (d, api)
}

/// One worker's storm: registrations of new upstreams, renewals and deregistrations of its own,
/// each recorded as sent, then as acknowledged, until the daemon stops answering.
async fn storm(worker: usize, base: String, model: Model, ports: Arc<AtomicU16>) {
    let client = reqwest::Client::new();
    let mut live: Vec<String> = Vec::new();
    for step in 0u64.. {
        let pick = step % 8;
        let upstream = match (pick, live.is_empty()) {
            (0..=3, _) | (_, true) => {
                let port = ports.fetch_add(1, Ordering::Relaxed);
                format!("127.0.0.1:{port}")
            }
            _ => live[(step as usize / 8) % live.len()].clone(),
        };
        let before = model.lock().expect("the model").get(&upstream).cloned();
        let id = match &before {
            Some(Known::Live { id, .. }) => Some(id.clone()),
            _ => None,
        };
        let (request, removing) = match (&id, pick) {
            (None, _) => (
                client
                    .post(format!("{base}/api/v1/services"))
                    .json(&json!({"name": format!("svc{}", worker % 4), "upstream": upstream, "ttl_secs": 600})),
                false,
            ),
            (Some(id), 4..=6) => (client.put(format!("{base}/api/v1/services/{id}/lease")), false),
            (Some(id), _) => (client.delete(format!("{base}/api/v1/services/{id}")), true),
        };
        model.lock().expect("the model").insert(
            upstream.clone(),
            Known::Unknown {
                id: id.clone(),
                live_expires_at: match &before {
                    Some(Known::Live { expires_at, .. }) => Some(expires_at.clone()),
                    _ => None,
                },
            },
        );
        let Ok(resp) = request.timeout(Duration::from_secs(5)).send().await else {
            return;
        };
        let status = resp.status();
        let Ok(body) = resp.bytes().await else {
            return;
        };
        assert!(status.is_success(), "worker {worker}: {status} {body:?}");
        let known = if removing {
            live.retain(|u| *u != upstream);
            Known::Removed
        } else {
            let grant: Value = serde_json::from_slice(&body).expect("a grant");
            if !live.contains(&upstream) {
                live.push(upstream.clone());
            }
            Known::Live {
                id: grant["id"].as_str().expect("id").to_owned(),
                expires_at: grant["lease"]["expires_at"]
                    .as_str()
                    .expect("expires_at")
                    .to_owned(),
            }
        };
        model.lock().expect("the model").insert(upstream, known);
    }
}

/// Every instance the daemon has, by upstream: its id and its lease's end.
async fn restored(base: &str) -> BTreeMap<String, (String, String)> {
    let body: Value = reqwest::get(format!("{base}/api/v1/services"))
        .await
        .expect("GET services")
        .json()
        .await
        .expect("JSON");
    let mut out = BTreeMap::new();
    for service in body["services"].as_array().expect("services") {
        for i in service["instances"].as_array().into_iter().flatten() {
            out.insert(
                i["upstream"].as_str().unwrap_or_default().to_owned(),
                (
                    i["id"].as_str().unwrap_or_default().to_owned(),
                    i["lease"]["expires_at"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                ),
            );
        }
    }
    out
}

/// Checks what came back against what was acknowledged, and makes what came back the model's
/// truth for the next round.
fn check(model: &Model, back: &BTreeMap<String, (String, String)>) -> (usize, usize) {
    let mut model = model.lock().expect("the model");
    let sent: BTreeSet<&String> = model.keys().collect();
    for upstream in back.keys() {
        assert!(
            sent.contains(upstream),
            "{upstream} came back, yet was never registered"
        );
    }
    let (mut acknowledged, mut unknown) = (0, 0);
    for (upstream, known) in model.iter_mut() {
        let now = back.get(upstream);
        match known {
            Known::Live { id, expires_at } => {
                acknowledged += 1;
                let Some((back_id, back_expires)) = now else {
                    panic!("{upstream} was acknowledged live ({id}) and is lost");
                };
                assert_eq!(back_id, id, "{upstream} came back as another instance");
                assert!(
                    back_expires >= expires_at,
                    "{upstream}'s lease came back shorter than acknowledged: {back_expires} < {expires_at}"
                );
            }
            Known::Removed => {
                acknowledged += 1;
                assert!(
                    now.is_none(),
                    "{upstream} was acknowledged removed and came back"
                );
            }
            Known::Unknown {
                id,
                live_expires_at,
            } => {
                unknown += 1;
                if let (Some(id), Some((back_id, back_expires)), Some(was)) =
                    (id.as_ref(), now, live_expires_at.as_ref())
                {
                    assert_eq!(back_id, id);
                    assert!(back_expires >= was, "{upstream}'s lease went back");
                }
            }
        }
        *known = match now {
            Some((id, expires_at)) => Known::Live {
                id: id.clone(),
                expires_at: expires_at.clone(),
            },
            None => Known::Removed,
        };
    }
    (acknowledged, unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_storm_loses_no_acknowledged_change() {
    let state = tempfile::tempdir().expect("state dir");
    let routes = tempfile::tempdir().expect("routes dir");
    let model: Model = Arc::default();
    let ports = Arc::new(AtomicU16::new(20_000));
    let mut totals = (0, 0);
    for round in 0..4 {
        let (mut d, base) = daemon(state.path(), routes.path());
        if round > 0 {
            let (acknowledged, unknown) = check(&model, &restored(&base).await);
            totals = (totals.0 + acknowledged, totals.1 + unknown);
        }
        let workers: Vec<_> = (0..16)
            .map(|w| tokio::spawn(storm(w, base.clone(), model.clone(), ports.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        d.0.kill().expect("SIGKILL");
        let _ = d.0.wait();
        for w in workers {
            w.await.expect("a worker");
        }
    }
    let (d, base) = daemon(state.path(), routes.path());
    let (acknowledged, unknown) = check(&model, &restored(&base).await);
    totals = (totals.0 + acknowledged, totals.1 + unknown);
    eprintln!(
        "4 kills: {} acknowledged states checked, {} in flight at a kill",
        totals.0, totals.1
    );
    assert!(
        totals.0 > 500,
        "the storm was too small to tell: {totals:?}"
    );
    drop(d);
}

#[tokio::test]
async fn a_second_daemon_on_a_state_directory_is_refused() {
    let h = common::start().await;
    let mut config = harbor::Config::new(h.routes.path(), h.state.path());
    config.api = vec![harbor::config::ListenAddr::Tcp(
        "127.0.0.1:0".parse().expect("addr"),
    )];
    config.proxy_listen = "127.0.0.1:0".parse().expect("addr");
    let Err(e) = harbor::start(config).await else {
        panic!("a second daemon started on the same state directory");
    };
    let message = format!("{e:#}");
    assert!(
        message.contains("in use by another Harbor")
            && message.contains(&format!("PID {}", std::process::id())),
        "{message}"
    );
    h.shutdown().await;
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_changes_with_the_reason_and_recovers_by_itself() {
    let disk = match Tmpfs::mount("16m") {
        Ok(disk) => disk,
        Err(why) => {
            // A container without the right to mount cannot fill a disk of its own; a
            // read-only directory is no stand-in (root writes to it anyway).
            eprintln!(
                "SKIPPED: no tmpfs can be mounted here ({why}); the full-disk test needs one"
            );
            return;
        }
    };
    let state = disk.path().join("state");
    let dir = state.clone();
    let h = common::start_with(move |c| c.state_dir = dir.clone()).await;
    let mut events = h.events(None).await;
    let register = |port: u16| {
        let h = &h;
        async move {
            let r = h
                .client
                .post(h.url("/api/v1/services"))
                .json(&json!({"name": "web", "upstream": format!("127.0.0.1:{port}"), "ttl_secs": 600}))
                .send()
                .await
                .expect("the API answers");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or_default())
        }
    };
    for port in 1..=5 {
        assert_eq!(register(port).await.0, 201);
    }

    // Fill the disk.
    let filler = disk.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        // Large blocks, then single bytes: not even a short journal line fits after.
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&[0]).is_ok() {}
    }
    // The journal's last page may still hold a few lines; once a change is refused, every
    // change after it is.
    let mut refused = Vec::new();
    for port in 100..200 {
        let (status, body) = register(port).await;
        if status == 201 && refused.is_empty() {
            continue;
        }
        assert_eq!(status, 503, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("No space left on device"), "{body}");
        refused.push(port);
        if refused.len() == 5 {
            break;
        }
    }
    assert_eq!(refused.len(), 5, "a full disk refused only {refused:?}");
    let e = events.next_of("state_write_failed").await;
    assert!(
        e.data["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("No space left"),
        "{:?}",
        e.data
    );
    let (_, status) = h.get("/api/v1/status").await;
    assert_eq!(status["state_writable"], false, "{status}");
    assert!(status["state"]["write_error"].is_string(), "{status}");
    let metrics = h.metrics().await;
    assert!(metrics.contains("harbor_state_writable 0"), "{metrics}");
    let snapshot = h.events(None).await.next_of("snapshot").await;
    assert!(
        snapshot.data["state"]["write_error"].is_string(),
        "{:?}",
        snapshot.data
    );

    // Room again: Harbor finds out by itself, and changes are taken.
    std::fs::remove_file(&filler).expect("remove the filler");
    events.next_of("state_write_recovered").await;
    eventually(
        Duration::from_secs(5),
        "registrations taken again",
        || async { (register(200).await.0 == 201).then_some(()) },
    )
    .await;
    let (_, status) = h.get("/api/v1/status").await;
    assert_eq!(status["state_writable"], true, "{status}");
    let leftovers: Vec<String> = std::fs::read_dir(&state)
        .expect("state dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // Everything acknowledged is there after a restart; the refused registrations that were
    // never made are not.
    let h = h.restart().await;
    let (_, body) = h.get("/api/v1/services").await;
    let upstreams: BTreeSet<String> = body["services"][0]["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["upstream"].as_str().map(str::to_owned))
        .collect();
    for port in (1..=5).chain([200]) {
        assert!(
            upstreams.contains(&format!("127.0.0.1:{port}")),
            "{upstreams:?}"
        );
    }
    for port in refused.iter().skip(1) {
        assert!(
            !upstreams.contains(&format!("127.0.0.1:{port}")),
            "{upstreams:?}"
        );
    }
    h.shutdown().await;
    drop(disk);
}
