//! Harbor driving a real Caddy through the Caddy adapter: routes from files and registrations
//! reach Caddy's listener quickly, leave it on expiry and deletion, never disturb the user's own
//! routes, come back after Caddy restarts from its Caddyfile, and survive a hand edit.

// The tests are plain functions run once per Caddy release (see `on_each_caddy!`), which
// clippy does not see as tests.
#![allow(clippy::unwrap_used)]

use crate::common;

// Only the swap test opens the page here: the rest of the browser's helpers go unused.
#[allow(dead_code)]
#[path = "common/browser.rs"]
mod browser;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::proxies::{
    Caddy, Release, Upstream, bodies, checked_route, free_port, listening_processes, none_failed,
    steady_stream, through, through_as_browsers_do, until_routed,
};
use common::upstreams::{HttpBackend, health_checks_hold_out_a_failing_upstream};
use common::{TestHarbor, eventually};
use harbor::config::BackendKind;
use serde_json::{Value, json};
use tokio::sync::RwLockReadGuard;

async fn harbor_for(caddy: &Caddy) -> TestHarbor {
    let admin: harbor::config::BaseUrl = caddy.admin_url().parse().expect("admin url");
    let listen = caddy.listen_addr();
    common::start_with(move |c| {
        c.backend = BackendKind::Caddy;
        c.caddy_admin = admin.clone();
        c.caddy_listen = listen;
        c.rescan_interval = Some(Duration::from_millis(200));
    })
    .await
}

/// The test's (shared) turn, a Caddy of its own and a Harbor driving it; none when Caddy is not
/// installed and not required.
async fn caddy_and_harbor(
    release: Release,
) -> Option<(RwLockReadGuard<'static, ()>, Caddy, TestHarbor)> {
    let turn = common::MACHINE.read().await;
    let caddy = Caddy::start(release).await?;
    let h = harbor_for(&caddy).await;
    Some((turn, caddy, h))
}

/// A Harbor driving `caddy`, with `envoy`'s settings in place for a swap to it.
async fn harbor_for_caddy_and_envoy(caddy: &Caddy, envoy: &common::proxies::Envoy) -> TestHarbor {
    let admin: harbor::config::BaseUrl = caddy.admin_url().parse().unwrap();
    let envoy_admin: harbor::config::BaseUrl = envoy.admin_url().parse().unwrap();
    let (listen, dir, envoy_listen) = (caddy.listen_addr(), envoy.xds.clone(), envoy.listen_addr());
    common::start_with(move |c| {
        c.backend = BackendKind::Caddy;
        c.caddy_admin = admin.clone();
        c.caddy_listen = listen;
        c.envoy_admin = envoy_admin.clone();
        c.envoy_dir = dir.clone();
        c.proxy_listen = envoy_listen;
    })
    .await
}

/// Registers `web` at `web.localhost` with Harbor and waits until Caddy routes to it.
async fn web_routed(caddy: &Caddy, h: &TestHarbor) -> Upstream {
    let web = Upstream::start("web").await;
    h.register(json!({"name": "web", "upstream": web.addr.to_string(), "ttl_secs": 60, "host": "web.localhost"}))
        .await;
    until_routed(caddy, "web.localhost", "web", Duration::from_secs(3)).await;
    web
}

async fn until_gone(caddy: &Caddy, host: &str, within: Duration) {
    let client = reqwest::Client::new();
    let addr = caddy.listen_addr();
    eventually(within, &format!("{host} no longer routed"), || {
        let client = client.clone();
        async move {
            match through(&client, addr, host, "/").await {
                Some((200, body)) if !body.is_empty() => None,
                Some(_) => Some(()),
                None => None,
            }
        }
    })
    .await;
}

async fn backend_status(h: &TestHarbor) -> Value {
    let (status, body) = h.get("/api/v1/backend").await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn user_route_works(caddy: &Caddy) {
    let client = reqwest::Client::new();
    let r = through(&client, caddy.listen_addr(), "127.0.0.1", "/user").await;
    assert_eq!(r, Some((200, "user route".to_owned())));
}

async fn files_and_registrations_reach_caddy_and_leave_it(release: Release) {
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    let web = Upstream::start("web").await;
    let api = Upstream::start("api").await;

    h.write_route(
        "web.route",
        &format!("host = \"web.localhost\"\nupstreams = [\"{}\"]\n", web.addr),
    );
    // How fast is the backends benchmark's business; here, within a generous deadline. (The
    // first route also waits for the adapter's compilation, which a test run alone pays.)
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(3)).await;
    h.register(json!({"name": "api", "upstream": api.addr.to_string(), "ttl_secs": 1, "host": "api.localhost"}))
        .await;
    until_routed(&caddy, "api.localhost", "api", Duration::from_secs(3)).await;
    user_route_works(&caddy).await;

    let status = backend_status(&h).await;
    assert_eq!(status["adapter"], "caddy");
    assert_eq!(status["backend"], "caddy");
    let version = status["proxy_version"].as_str().unwrap_or_default();
    assert!(
        version.trim_start_matches('v').starts_with(&caddy.version),
        "Harbor should have asked Caddy {} its version: {status}",
        caddy.version
    );
    assert!(status["applied_revision"].as_u64().is_some(), "{status}");

    // The lease runs out (no renewal) and the file goes: both routes leave Caddy.
    until_gone(&caddy, "api.localhost", Duration::from_secs(4)).await;
    std::fs::remove_file(h.routes.path().join("web.route")).expect("remove route file");
    until_gone(&caddy, "web.localhost", Duration::from_secs(3)).await;
    user_route_works(&caddy).await;
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("harbor_backend_applies_total{adapter=\"caddy\",result=\"ok\"}"),
        "{metrics}"
    );
    // Every write Harbor counts is one Caddy's admin API received, and no more. Both are read
    // again until they agree: Caddy's log, where its writes are counted, may lag a loaded
    // machine by a moment.
    let counted = |metrics: &str| -> usize {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("harbor_backend_writes_total{adapter=\"caddy\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no writes counted: {metrics}"))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut metrics = metrics;
    while counted(&metrics) != caddy.config_writes() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = h.metrics().await;
    }
    let counted = counted(&metrics);
    assert_eq!(counted, caddy.config_writes(), "{metrics}");
    h.shutdown().await;
}

async fn a_restarted_caddy_gets_harbors_routes_back(release: Release) {
    let _turn = common::MACHINE.read().await;
    let Some(mut caddy) = Caddy::start(release).await else {
        return;
    };
    let h = harbor_for(&caddy).await;
    let _web = web_routed(&caddy, &h).await;
    let mut events = h.events(None).await;

    caddy.start_again().await;
    let back = Instant::now();
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(4)).await;
    assert!(
        back.elapsed() < Duration::from_secs(2),
        "routes came back after {:?}",
        back.elapsed()
    );
    events.next_of("backend_drift").await;
    user_route_works(&caddy).await;
    h.shutdown().await;
}

async fn routes_registered_during_a_long_caddy_outage_arrive_soon_after_it_ends(release: Release) {
    let _turn = common::MACHINE.read().await;
    let Some(mut caddy) = Caddy::start(release).await else {
        return;
    };
    let h = harbor_for(&caddy).await;
    let _web = web_routed(&caddy, &h).await;
    caddy.kill();
    // Registrations during a 12 s outage: the retries back off to their 5 s cap meanwhile.
    let mut late = Vec::new();
    for i in 0..3 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let name = format!("late{i}");
        let upstream = Upstream::start(&name).await;
        h.register(
            json!({"name": name, "upstream": upstream.addr.to_string(), "ttl_secs": 60,
            "host": format!("{name}.localhost")}),
        )
        .await;
        late.push(upstream);
    }
    caddy.start_again().await;
    let back = Instant::now();
    until_routed(&caddy, "late2.localhost", "late2", Duration::from_secs(3)).await;
    until_routed(&caddy, "late0.localhost", "late0", Duration::from_secs(1)).await;
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(1)).await;
    eprintln!(
        "Caddy {}: routes back {:?} after it answered",
        caddy.version,
        back.elapsed()
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_address_that_is_not_caddy_is_a_clear_error() {
    let _turn = common::MACHINE.read().await;
    // Not Caddy at all: a plain web server where Caddy's admin API should be.
    let impostor = Upstream::start("not caddy").await;
    let admin: harbor::config::BaseUrl = format!("http://{}", impostor.addr).parse().unwrap();
    let h = common::start_with(move |c| {
        c.backend = BackendKind::Caddy;
        c.caddy_admin = admin.clone();
    })
    .await;
    common::a_lasting_backend_error(&h, "does not answer as Caddy's admin API").await;
    h.shutdown().await;
}

/// Caddy's configuration names Harbor's DNS responder; a responder on a new port at every start
/// made every restart of Harbor rewrite it.
async fn a_restart_of_harbor_leaves_caddys_configuration_as_it_was(release: Release) {
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    let _web = web_routed(&caddy, &h).await;
    let in_sync = |h: &TestHarbor| {
        let (client, url) = (h.client.clone(), h.url("/api/v1/backend"));
        async move {
            let status: Value = client.get(url).send().await.ok()?.json().await.ok()?;
            (status["in_sync"] == true).then_some(())
        }
    };
    eventually(Duration::from_secs(5), "Caddy in step", || in_sync(&h)).await;
    let before = caddy_config(&caddy).await.expect("Caddy's configuration");

    let h = h.restart().await;
    eventually(Duration::from_secs(10), "Caddy in step again", || {
        in_sync(&h)
    })
    .await;
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(3)).await;
    let after = caddy_config(&caddy).await.expect("Caddy's configuration");
    assert_eq!(after, before, "the restart changed nothing in Caddy");
    h.shutdown().await;
}

async fn a_hand_edit_of_harbors_route_is_repaired(release: Release) {
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    let _web = web_routed(&caddy, &h).await;
    let mut events = h.events(None).await;

    // Someone edits Harbor's routes by hand: web.localhost now answers something else.
    let client = reqwest::Client::new();
    let edited = client
        .patch(format!("{}/id/harbor/handle/0/routes", caddy.admin_url()))
        .json(&json!([{"match": [{"host": ["web.localhost"]}], "handle": [{"handler": "static_response", "body": "hijacked"}]}]))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(edited.status(), 200);
    let drift = events.next_of("backend_drift").await;
    assert!(
        drift.data["detail"]
            .as_str()
            .unwrap_or("")
            .contains("changed"),
        "{:?}",
        drift.data
    );
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(2)).await;
    user_route_works(&caddy).await;
    h.shutdown().await;
}

async fn harbor_starts_with_caddy_down_and_converges_when_it_comes_up(release: Release) {
    let _turn = common::MACHINE.read().await;
    let Some(mut caddy) = Caddy::start(release).await else {
        return;
    };
    caddy.kill();
    let h = harbor_for(&caddy).await;
    let web = Upstream::start("web").await;
    h.register(json!({"name": "web", "upstream": web.addr.to_string(), "ttl_secs": 60, "host": "web.localhost"}))
        .await;
    let status = eventually(Duration::from_secs(3), "the failure shown", || async {
        let s = backend_status(&h).await;
        s["last_error"].as_str().is_some().then_some(s)
    })
    .await;
    assert_eq!(status["in_sync"], false);
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{status}"
    );

    caddy.start_again().await;
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(8)).await;
    eventually(Duration::from_secs(3), "in sync", || async {
        let s = backend_status(&h).await;
        (s["in_sync"] == true).then_some(())
    })
    .await;
    h.shutdown().await;
}

async fn bad_swaps_are_refused_and_the_old_adapter_keeps_serving(release: Release) {
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    let _web = web_routed(&caddy, &h).await;

    let put = |body: reqwest::Body, ct: &'static str| {
        h.client
            .put(h.url("/api/v1/backend"))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let r = put("{not json".into(), "application/json").await.unwrap();
    assert_eq!(r.status(), 400);
    let r = put(r#"{"adapter":"nginx"}"#.into(), "application/json")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = put(
        r#"{"adapter":"caddy","config":{"route_id":"no spaces"}}"#.into(),
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
    let r = put(b"\0asm garbage".to_vec().into(), "application/wasm")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("refused"),
        "{body}"
    );

    let status = backend_status(&h).await;
    assert_eq!(status["adapter"], "caddy");
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(1)).await;

    // A good swap to the same built-in works and keeps the route.
    let r = put(r#"{"adapter":"caddy"}"#.into(), "application/json")
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(1)).await;
    h.shutdown().await;
}

/// Requests through Caddy in a loop until stopped: (successes, failures).
fn load(
    addr: std::net::SocketAddr,
    host: &'static str,
    want: &'static str,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<(u64, Vec<String>)>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let until = stop.clone();
    let task = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let (mut ok, mut failed) = (0u64, Vec::new());
        while !until.is_cancelled() {
            match through(&client, addr, host, "/").await {
                Some((200, body)) if body == want => ok += 1,
                other => failed.push(format!("{other:?}")),
            }
        }
        (ok, failed)
    });
    (stop, task)
}

async fn swapping_the_caddy_adapter_twenty_times_under_load_fails_no_request(release: Release) {
    let _turn = common::MACHINE.write().await;
    let Some(caddy) = Caddy::start(release).await else {
        return;
    };
    let original = common::guests::component("backend-caddy", &[]);
    let rebuilt = common::guests::component("backend-caddy", &["rebuilt"]);
    assert_ne!(original, rebuilt);
    let h = harbor_for(&caddy).await;
    let _web = web_routed(&caddy, &h).await;

    let (stop, task) = load(caddy.listen_addr(), "web.localhost", "web");
    for i in 0..20u32 {
        let (bytes, version) = if i.is_multiple_of(2) {
            (rebuilt.clone(), "0.1.0+rebuilt")
        } else {
            (original.clone(), "0.1.0")
        };
        let r = h
            .client
            .put(h.url("/api/v1/backend?proxy=caddy"))
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await
            .expect("PUT backend");
        let status: Value = r.json().await.expect("status");
        assert_eq!(status["version"], version, "{status}");
        assert_eq!(status["in_sync"], true, "{status}");
    }
    stop.cancel();
    let (ok, failed) = task.await.expect("load task");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 20, "only {ok} requests went through");
    h.shutdown().await;
}

async fn switching_between_caddy_and_envoy_leaves_nothing_of_the_other_behind(release: Release) {
    let _turn = common::MACHINE.read().await;
    let Some(caddy) = Caddy::start(release).await else {
        return;
    };
    let Some(mut envoy) = common::proxies::Envoy::prepare() else {
        return;
    };
    let h = harbor_for_caddy_and_envoy(&caddy, &envoy).await;
    let envoy_listen = envoy.listen_addr();
    let _web = web_routed(&caddy, &h).await;
    let (_, status) = h.get("/api/v1/status").await;
    assert_eq!(
        status["proxy_port"], caddy.listen,
        "links point at Caddy: {status}"
    );
    // Gangway, open through the swaps, names the proxy in force and links to its port.
    let shown = h
        .register(json!({"name": "shown", "upstream": "127.0.0.1:9", "ttl_secs": 60, "host": "shown.localhost", "public": true}))
        .await;
    assert!(shown["id"].is_string());
    let page = match browser::tools() {
        Some(tools) => Some(browser::Browser::launch(&tools).await),
        None => None,
    };
    let on_page = |proxy: &'static str, port: u16| {
        format!(
            "return document.getElementById('st-backend').textContent === '{proxy}' \
             && [...document.querySelectorAll('#rows a')].some(a => a.href === 'http://shown.localhost:{port}/')"
        )
    };
    if let Some(b) = &page {
        b.goto(&h.url("/")).await;
        b.wait_for(
            Duration::from_secs(10),
            "Caddy and its port on the page",
            &on_page("caddy", caddy.listen),
        )
        .await;
    }

    // Envoy is not running: the swap is refused before anything is written, and Caddy keeps
    // serving through it.
    let addr = caddy.listen_addr();
    let (stop, stream) = steady_stream(vec![(addr, "web.localhost", "web")]);
    let swap = || {
        h.client
            .put(h.url("/api/v1/backend"))
            .json(&json!({"adapter": "envoy"}))
            .send()
    };
    let r = swap().await.unwrap();
    assert_eq!(r.status(), 502, "{}", r.text().await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let (ok, failed) = stream.await.expect("the stream");
    assert!(failed.is_empty() && ok > 0, "{ok} answered, {failed:?}");
    assert_eq!(backend_status(&h).await["adapter"], "caddy");
    assert!(
        !envoy.xds.join("lds.json").exists(),
        "nothing was written for the Envoy that is down"
    );

    // With Envoy up (its bootstrap's files in place, empty, as an operator sets it up), the
    // swap proves it serves the state before Caddy's routes go.
    envoy.write_empty_bootstrap_files();
    envoy.start_process().await;
    let r = swap().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    until_gone(&caddy, "web.localhost", Duration::from_secs(2)).await;
    let id = reqwest::get(format!("{}/id/harbor", caddy.admin_url()))
        .await
        .unwrap();
    assert_eq!(id.status(), 404);
    user_route_works(&caddy).await;
    // Both status endpoints name the proxy in force, not the one Harbor started with, and
    // Gangway's links point at it.
    assert_eq!(backend_status(&h).await["backend"], "envoy");
    let (_, status) = h.get("/api/v1/status").await;
    assert_eq!(status["backend"], "envoy", "{status}");
    assert_eq!(status["proxy_port"], envoy_listen.port(), "{status}");
    if let Some(b) = &page {
        b.wait_for(
            Duration::from_secs(10),
            "Envoy and its port on the page, without a reload",
            &on_page("envoy", envoy_listen.port()),
        )
        .await;
    }
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(5), "web through Envoy", || {
        let client = client.clone();
        async move {
            match through(&client, envoy_listen, "web.localhost", "/").await {
                Some((200, b)) if b == "web" => Some(()),
                _ => None,
            }
        }
    })
    .await;

    // And back: Envoy's adapter leaves only its two bootstrap files behind, empty.
    let r = h
        .client
        .put(h.url("/api/v1/backend"))
        .json(&json!({"adapter": "caddy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(3)).await;
    if let Some(b) = page {
        b.wait_for(
            Duration::from_secs(10),
            "Caddy and its port on the page again",
            &on_page("caddy", caddy.listen),
        )
        .await;
        b.close().await;
    }
    let mut left: Vec<String> = std::fs::read_dir(&envoy.xds)
        .expect("the xDS directory")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    left.sort();
    assert_eq!(left, ["cds.json", "lds.json"]);
    for file in &left {
        let doc: Value =
            serde_json::from_slice(&std::fs::read(envoy.xds.join(file)).expect("read")).unwrap();
        assert_eq!(doc["resources"], json!([]), "{file}");
    }
    h.shutdown().await;
}

/// Caddy carries no tcp routes, so Harbor's own TCP proxy does; Envoy carries them itself. A
/// swap between the two hands each port over with never two processes listening on it, and
/// new connections find a listener again within a second. Once, on Debian's Caddy: what moves
/// is Harbor's and Envoy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_hands_tcp_ports_over_with_one_listener_at_a_time() {
    let _turn = common::MACHINE.read().await;
    let Some(caddy) = Caddy::start(Release::Debian).await else {
        return;
    };
    let Some(mut envoy) = common::proxies::Envoy::prepare() else {
        return;
    };
    envoy.write_empty_bootstrap_files();
    envoy.start_process().await;
    let h = harbor_for_caddy_and_envoy(&caddy, &envoy).await;
    let db = Upstream::start("db").await;
    let port = free_port();
    let tcp = SocketAddr::from(([127, 0, 0, 1], port));
    h.write_route(
        "db.route",
        &format!(
            "protocol = \"tcp\"\nlisten = \"{tcp}\"\nupstreams = [\"{}\"]\n",
            db.addr
        ),
    );
    // A new connection for every request: an open one stays with whoever accepted it.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let forwarding =
        || async { through(&fresh, tcp, "x", "/").await == Some((200, "db".to_owned())) };
    eventually(
        Duration::from_secs(5),
        "Harbor's TCP proxy forwarding",
        || async { forwarding().await.then_some(()) },
    )
    .await;
    let harbor = std::process::id();
    let envoy_pid = envoy.pid().unwrap();
    let both = [harbor, envoy_pid];
    assert_eq!(listening_processes(port, &both), [harbor].into());

    // Who listens, sampled throughout, and the longest run of failed new connections.
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::task::spawn_blocking({
        let stop = stop.clone();
        move || {
            let mut seen = Vec::new();
            while !stop.is_cancelled() {
                seen.push(listening_processes(port, &both));
                // Other tests run beside this one: the sampler leaves them a core.
                std::thread::sleep(Duration::from_millis(1));
            }
            seen
        }
    });
    let prober = tokio::spawn({
        let (stop, fresh) = (stop.clone(), fresh.clone());
        async move {
            let (mut longest, mut failing_since, mut ok) = (Duration::ZERO, None, 0u32);
            while !stop.is_cancelled() {
                if through(&fresh, tcp, "x", "/").await == Some((200, "db".to_owned())) {
                    ok += 1;
                    if let Some(since) = failing_since.take() {
                        longest = longest.max(Instant::elapsed(&since));
                    }
                } else {
                    failing_since.get_or_insert_with(Instant::now);
                }
                // Each connection leaves a line in the kernel's table the sampler reads.
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (longest, ok)
        }
    });
    let swap = |to: &'static str| {
        let h = &h;
        async move {
            let r = h
                .client
                .put(h.url("/api/v1/backend"))
                .json(&json!({"adapter": to}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "to {to}: {}", r.text().await.unwrap());
        }
    };
    let held_by = |pid: u32| async move {
        eventually(
            Duration::from_secs(3),
            "the port changing hands",
            || async { (listening_processes(port, &both) == [pid].into()).then_some(()) },
        )
        .await;
    };
    swap("envoy").await;
    held_by(envoy_pid).await;
    eventually(Duration::from_secs(3), "Envoy forwarding", || async {
        forwarding().await.then_some(())
    })
    .await;
    swap("caddy").await;
    held_by(harbor).await;
    eventually(
        Duration::from_secs(3),
        "Harbor forwarding again",
        || async { forwarding().await.then_some(()) },
    )
    .await;
    stop.cancel();
    let seen = sampler.await.unwrap();
    let (longest, ok) = prober.await.unwrap();
    eprintln!(
        "{} samples of the port's listeners; longest gap for new connections {longest:?}; {ok} answered",
        seen.len()
    );
    let shared: Vec<_> = seen.iter().filter(|pids| pids.len() > 1).collect();
    assert!(
        shared.is_empty(),
        "two processes listened at once: {shared:?}"
    );
    assert!(
        longest <= Duration::from_secs(1),
        "new connections failed for {longest:?}"
    );
    h.shutdown().await;
}

/// `GET /api/v1/backend/config` shows what Harbor wrote, which is what Caddy holds; a dry run
/// of a registration or a swap shows what would be written and writes nothing, even when the
/// adapter tries.
async fn the_pushed_config_and_dry_runs_show_what_is_written_and_write_nothing(release: Release) {
    let sneaky = common::guests::component("harbor-test-bad-adapter", &[]);
    let Some(envoy) = common::proxies::Envoy::prepare() else {
        return;
    };
    let Some(caddy) = Caddy::start(release).await else {
        return;
    };
    let _turn = common::MACHINE.read().await;
    let h = harbor_for_caddy_and_envoy(&caddy, &envoy).await;
    let listen = caddy.listen_addr();
    let _web = web_routed(&caddy, &h).await;

    // What was pushed is what Caddy holds, document for document.
    let (status, pushed) = h.get("/api/v1/backend/config").await;
    assert_eq!(status, 200, "{pushed}");
    assert_eq!(pushed["adapter"], "caddy");
    let documents = pushed["documents"].as_array().unwrap();
    assert_eq!(documents.len(), 1, "{pushed}");
    let target = documents[0]["target"].as_str().unwrap();
    let live: Value = reqwest::get(format!("{}{target}", caddy.admin_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(documents[0]["content"], live);
    assert!(live.to_string().contains("web.localhost"), "{live}");

    // A dry registration: the service as it would be, Caddy's routes as they would be, and
    // nothing registered or written.
    let writes = caddy.config_writes();
    let other = Upstream::start("api").await;
    let registration = json!({"name": "api", "upstream": other.addr.to_string(), "ttl_secs": 60, "host": "api.localhost"});
    let r = h
        .client
        .post(h.url("/api/v1/services?dry_run=true"))
        .json(&registration)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let dry: Value = r.json().await.unwrap();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["service"]["name"], "api", "{dry}");
    let would = dry["backend"]["documents"][0]["content"].to_string();
    assert!(
        would.contains("api.localhost") && would.contains("web.localhost"),
        "{dry}"
    );
    // A misspelt flag is an error, not a registration.
    let r = h
        .client
        .post(h.url("/api/v1/services?dryrun=true"))
        .json(&registration)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(h.service("api").await.is_none(), "nothing was registered");
    assert_eq!(
        caddy.config_writes(),
        writes,
        "nothing was written to Caddy"
    );
    assert!(
        through(&reqwest::Client::new(), listen, "api.localhost", "/").await
            != Some((200, "api".into()))
    );

    // A dry swap to Envoy: its files as they would be, with none written (Envoy is not even
    // running: a dry run does not need it).
    let r = h
        .client
        .put(h.url("/api/v1/backend?dry_run=true"))
        .json(&json!({"adapter": "envoy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let dry: Value = r.json().await.unwrap();
    assert_eq!(dry["adapter"], "envoy", "{dry}");
    let mut files: Vec<&str> = dry["documents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["target"].as_str())
        .collect();
    files.sort_unstable();
    assert_eq!(files, ["cds.json", "eds-web.json", "lds.json", "rds.json"]);
    assert_eq!(
        std::fs::read_dir(&envoy.xds).unwrap().count(),
        0,
        "no file written"
    );
    assert_eq!(backend_status(&h).await["adapter"], "caddy");

    // An adapter that tries to write during a dry run is refused by the host.
    let r = h
        .client
        .put(h.url("/api/v1/backend?dry_run=true"))
        .header("content-type", "application/wasm")
        .body(sneaky)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let dry: Value = r.json().await.unwrap();
    let answer = dry["documents"][0]["content"].as_str().unwrap_or_default();
    assert!(answer.starts_with("forbidden: POST /load"), "{dry}");
    assert_eq!(
        caddy.config_writes(),
        writes,
        "nothing was written to Caddy"
    );
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(2)).await;
    h.shutdown().await;
}

/// `caddy reload` from a Caddyfile drops what Harbor added until Harbor's probe puts it back.
/// With Harbor's routes on a port of their own, as the README advises, a request in that gap
/// finds no listener, which clients retry; it never gets a wrong answer such as an empty `200`
/// from another site.
async fn a_caddy_reload_never_answers_harbors_hosts_wrongly(release: Release) {
    let _turn = common::MACHINE.read().await;
    let Some(caddy) = Caddy::start(release).await else {
        return;
    };
    let admin: harbor::config::BaseUrl = caddy.admin_url().parse().unwrap();
    let own = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let h = common::start_with(move |c| {
        c.backend = BackendKind::Caddy;
        c.caddy_admin = admin.clone();
        c.caddy_listen = own;
    })
    .await;
    let web = Upstream::start("web").await;
    h.register(json!({"name": "web", "upstream": web.addr.to_string(), "ttl_secs": 60, "host": "web.localhost"}))
        .await;
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    // Set-up, not what is measured: the first route also waits for Caddy to start a server on
    // Harbor's own address, beside the other Caddy tests running at once.
    eventually(Duration::from_secs(10), "web through Caddy", || async {
        (through(&fresh, own, "web.localhost", "/").await == Some((200, "web".into())))
            .then_some(())
    })
    .await;

    let stop = tokio_util::sync::CancellationToken::new();
    let prober = tokio::spawn({
        let (stop, fresh) = (stop.clone(), fresh.clone());
        async move {
            let (mut ok, mut refused, mut wrong) = (0u32, 0u32, Vec::new());
            while !stop.is_cancelled() {
                match through(&fresh, own, "web.localhost", "/").await {
                    Some((200, body)) if body == "web" => ok += 1,
                    None => refused += 1,
                    Some(other) => wrong.push(other),
                }
            }
            (ok, refused, wrong)
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reloaded = Instant::now();
    caddy.reload();
    let back = eventually(Duration::from_secs(3), "Harbor's routes back", || async {
        (through(&fresh, own, "web.localhost", "/").await == Some((200, "web".into())))
            .then(|| reloaded.elapsed())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let (ok, refused, wrong) = prober.await.unwrap();
    eprintln!("routes back {back:?} after the reload; {ok} answered, {refused} found no listener");
    assert!(
        wrong.is_empty(),
        "wrong answers during the reload: {wrong:?}"
    );
    assert!(ok > 20, "only {ok} answered");
    user_route_works(&caddy).await;
    h.shutdown().await;
}

async fn an_adapter_that_traps_or_spins_is_refused_and_reported(release: Release) {
    // Built before anything is registered: on a cold build directory compiling them takes
    // longer than web's lease, which then ran out while the test waited.
    let adapters = [(&[][..], "trap"), (&["spin"][..], "timeout")].map(|(features, fault)| {
        (
            common::guests::component("harbor-test-bad-adapter", features),
            fault,
        )
    });
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    let _web = web_routed(&caddy, &h).await;
    let mut events = h.events(None).await;

    for (bytes, fault) in adapters {
        let started = Instant::now();
        let r = h
            .client
            .put(h.url("/api/v1/backend"))
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await
            .expect("PUT backend");
        assert_eq!(r.status(), 502);
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains(fault), "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let e = events.next_of("plugin_fault").await;
        assert_eq!(e.data["fault"], fault, "{:?}", e.data);
        let e = events.next_of("backend_swap_failed").await;
        assert!(
            e.data["reason"].as_str().unwrap().contains(fault),
            "{:?}",
            e.data
        );
        let status = backend_status(&h).await;
        assert_eq!(status["version"], "0.1.0", "{status}");
        // Still routed: the refused adapter never touched Caddy. (The deadline is generous
        // because the spinning adapter has just burnt CPU on a busy machine.)
        until_routed(&caddy, "web.localhost", "web", Duration::from_secs(5)).await;
    }
    h.shutdown().await;
}

/// Loads `host` through Caddy with `concurrency` clients for `duration`: (requests, failures).
async fn measure(
    addr: std::net::SocketAddr,
    host: &'static str,
    want: &'static str,
    concurrency: usize,
    duration: Duration,
) -> (u64, Vec<String>) {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut ok, mut failed) = (0u64, Vec::new());
            while Instant::now() < deadline {
                // A reload closes idle keep-alive connections; the load retries as browsers
                // do, and a second failure, or any answer but the service's, counts.
                let answer = through_as_browsers_do(&client, addr, host).await;
                match answer {
                    Some((200, body)) if body == want => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, Vec::new());
    for t in tasks {
        let (o, f) = t.await.expect("load task");
        ok += o;
        failed.extend(f);
    }
    (ok, failed)
}

async fn instance_churn_does_not_reload_caddy_or_hurt_a_loaded_service(release: Release) {
    let _turn = common::MACHINE.write().await;
    let Some(caddy) = Caddy::start(release).await else {
        return;
    };
    let h = harbor_for(&caddy).await;
    let hot = Upstream::start("hot").await;
    let cold = Upstream::start("cold").await;
    h.register(json!({"name": "hot", "upstream": hot.addr.to_string(), "ttl_secs": 120, "host": "hot.localhost"}))
        .await;
    h.register(json!({"name": "cold", "upstream": cold.addr.to_string(), "ttl_secs": 120, "host": "cold.localhost"}))
        .await;
    until_routed(&caddy, "hot.localhost", "hot", Duration::from_secs(3)).await;
    until_routed(&caddy, "cold.localhost", "cold", Duration::from_secs(3)).await;
    // Live servers for the churning instances, so that a request sent to one succeeds.
    let mut pool = Vec::new();
    for i in 0..60u32 {
        pool.push(Upstream::start(if i.is_multiple_of(2) { "hot" } else { "cold" }).await);
    }
    let addrs: Vec<String> = pool.iter().map(|u| u.addr.to_string()).collect();

    // A quiet window, then 60 s of churn at 50 registrations a second (each lease 1 s): long
    // enough for the fallback lists to lag and be refreshed once. Throughput under churn is the
    // backends benchmark's business; this test holds the mechanism.
    let (concurrency, window, churn_for) = (4, Duration::from_secs(2), Duration::from_secs(60));
    let churning = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = tokio_util::sync::CancellationToken::new();
    let churn = {
        let (client, base, stop, churning) = (
            h.client.clone(),
            h.base.clone(),
            stop.clone(),
            churning.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut n = 0usize;
            let mut registered = 0u64;
            while !stop.is_cancelled() {
                tick.tick().await;
                if !churning.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                let (name, host) = if n.is_multiple_of(2) {
                    ("hot", "hot.localhost")
                } else {
                    ("cold", "cold.localhost")
                };
                let r = client
                    .post(format!("{base}/api/v1/services"))
                    .json(&json!({"name": name, "upstream": addrs[n % addrs.len()], "ttl_secs": 1, "host": host}))
                    .send()
                    .await
                    .expect("register");
                assert!(r.status().is_success(), "{}", r.status());
                registered += 1;
                n += 1;
            }
            registered
        })
    };
    let writes_before = caddy.config_writes();
    let (quiet, mut failed) = measure(
        caddy.listen_addr(),
        "hot.localhost",
        "hot",
        concurrency,
        window,
    )
    .await;
    churning.store(true, std::sync::atomic::Ordering::Relaxed);
    let (busy, f) = measure(
        caddy.listen_addr(),
        "hot.localhost",
        "hot",
        concurrency,
        churn_for,
    )
    .await;
    failed.extend(f);
    stop.cancel();
    let registered = churn.await.expect("churn task");
    let writes = caddy.config_writes() - writes_before;
    let (quiet_rate, busy_rate) = (
        quiet as f64 / window.as_secs_f64(),
        busy as f64 / churn_for.as_secs_f64(),
    );
    eprintln!(
        "churn: {registered} registrations in {churn_for:?}; {quiet_rate:.0} req/s quiet, {busy_rate:.0} req/s under churn; {writes} Caddy config writes; {} failed",
        failed.len()
    );
    assert!(registered >= 2400, "only {registered} registrations");
    assert!(
        failed.is_empty(),
        "{} requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // The mechanism is asserted: no failed request, and at most the one-a-minute refresh of
    // the fallback lists (two, if the minute falls just so). The throughput ratio is printed,
    // not asserted: on a shared 2-core machine the churn's own CPU (registrations, DNS answers)
    // competes with the load generator, and a speed target has no place in a test.
    assert!(writes <= 2, "instance churn reloaded Caddy {writes} times");
    eprintln!(
        "churn: throughput under churn is {:.0} % of the quiet rate",
        100.0 * busy_rate / quiet_rate.max(1.0)
    );
    h.shutdown().await;
}

async fn an_adapter_dropped_in_the_plugin_directory_takes_over(release: Release) {
    let _turn = common::MACHINE.read().await;
    let Some(caddy) = Caddy::start(release).await else {
        return;
    };
    let plugins = tempfile::tempdir().expect("plugins dir");
    let rebuilt = common::guests::component("backend-caddy", &["rebuilt"]);
    let admin: harbor::config::BaseUrl = caddy.admin_url().parse().unwrap();
    let (listen, dir) = (caddy.listen_addr(), plugins.path().to_owned());
    let h = common::start_with(move |c| {
        c.backend = BackendKind::Caddy;
        c.caddy_admin = admin.clone();
        c.caddy_listen = listen;
        c.plugins_dir = Some(dir.clone());
        c.rescan_interval = Some(Duration::from_millis(200));
    })
    .await;
    let _web = web_routed(&caddy, &h).await;
    let mut events = h.events(None).await;

    // A garbage file is refused; the built-in adapter keeps serving.
    std::fs::write(
        plugins.path().join("backend-broken.wasm"),
        b"not a component",
    )
    .unwrap();
    let failed = events.next_of("backend_swap_failed").await;
    assert!(
        failed.data["source"]
            .as_str()
            .unwrap()
            .ends_with("backend-broken.wasm"),
        "{:?}",
        failed.data
    );
    assert_eq!(backend_status(&h).await["version"], "0.1.0");

    common::write_bytes_atomically(&plugins.path().join("backend-caddy.wasm"), &rebuilt);
    let swapped = events.next_of("backend_swapped").await;
    assert_eq!(swapped.data["version"], "0.1.0+rebuilt");
    assert_eq!(backend_status(&h).await["version"], "0.1.0+rebuilt");
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(1)).await;
    // The strategies' scanner leaves adapter files alone.
    let (_, plugins_list) = h.get("/api/v1/plugins").await;
    assert!(
        !plugins_list.to_string().contains("backend-"),
        "{plugins_list}"
    );

    // Removing the file in force brings the built-in adapter back; the routes stay.
    std::fs::remove_file(plugins.path().join("backend-caddy.wasm")).expect("remove adapter");
    let swapped = events.next_of("backend_swapped").await;
    assert_eq!(swapped.data["version"], "0.1.0");
    let status = backend_status(&h).await;
    assert_eq!(status["source"], "builtin:caddy", "{status}");
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(1)).await;
    h.shutdown().await;
}

async fn harbors_health_checks_steer_caddys_dynamic_upstreams(release: Release) {
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    let (a, b) = (
        HttpBackend::start(Duration::ZERO).await,
        HttpBackend::start(Duration::ZERO).await,
    );
    h.write_route(
        "checked.route",
        &checked_route("checked.localhost", &[a.addr, b.addr]),
    );
    health_checks_hold_out_a_failing_upstream(&caddy, "checked.localhost", &a, &b).await;
    // Health changes reach Caddy through DNS answers, never through its configuration.
    let writes = caddy.config_writes();
    b.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    until_only(
        &caddy,
        "checked.localhost",
        &format!("served by {}", a.addr),
    )
    .await;
    assert_eq!(
        caddy.config_writes(),
        writes,
        "a health change reloaded Caddy"
    );
    h.shutdown().await;
}

async fn a_dead_instance_costs_round_robin_clients_nothing_without_passive_checks(
    release: Release,
) {
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    let live = Upstream::start("live").await;
    // An instance that died without deregistering: its lease still holds, nothing listens.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    for upstream in [live.addr, dead] {
        h.register(
            json!({"name": "rr", "upstream": upstream.to_string(), "ttl_secs": 60,
            "host": "rr.localhost", "strategy": "round-robin"}),
        )
        .await;
    }
    until_routed(&caddy, "rr.localhost", "live", Duration::from_secs(3)).await;
    let config = caddy_config(&caddy).await.expect("Caddy's configuration");
    assert!(
        config.contains("\"dynamic_upstreams\"") && !config.contains("\"passive\""),
        "the round-robin service should use dynamic upstreams without passive checks: {config}"
    );
    // Every other pick is the dead instance; the retry moves on to the live one.
    let answers = bodies(caddy.listen_addr(), "rr.localhost", 40).await;
    assert!(answers.iter().all(|b| b == "live"), "{answers:?}");
    h.shutdown().await;
}

/// Caddy's whole running configuration, as its admin API returns it.
async fn caddy_config(caddy: &Caddy) -> Option<String> {
    let response = reqwest::get(format!("{}/config/", caddy.admin_url()))
        .await
        .ok()?;
    response.text().await.ok()
}

/// Waits until twenty requests in a row to `host` through Caddy are answered with `want`.
async fn until_only(caddy: &Caddy, host: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while bodies(caddy.listen_addr(), host, 20)
        .await
        .iter()
        .any(|b| b != want)
    {
        assert!(Instant::now() < deadline, "{host}: never only {want}");
    }
}

/// Registers 100 round-robin instances of `wide` at `wide.localhost`.
async fn wide_service(h: &TestHarbor) -> Vec<Upstream> {
    let mut pool = Vec::new();
    for i in 0..100 {
        let u = Upstream::start(&format!("wide-{i}")).await;
        h.register(
            json!({"name": "wide", "upstream": u.addr.to_string(), "ttl_secs": 120,
            "host": "wide.localhost", "strategy": "round-robin"}),
        )
        .await;
        pool.push(u);
    }
    pool
}

/// Sends requests through Caddy until every one of `pool` has answered.
async fn reaches_them_all(caddy: &Caddy, pool: &[Upstream]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < pool.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} instances reached: missing {:?}",
            seen.len(),
            pool.len(),
            (0..pool.len())
                .map(|i| format!("wide-{i}"))
                .filter(|n| !seen.contains(n))
                .take(5)
                .collect::<Vec<_>>()
        );
        seen.extend(bodies(caddy.listen_addr(), "wide.localhost", 100).await);
    }
}

async fn a_big_round_robin_service_rotates_a_window_through_all_its_instances(release: Release) {
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    let pool = wide_service(&h).await;
    let config = eventually(Duration::from_secs(10), "wide routed", || async {
        let config = caddy_config(&caddy).await?;
        config.contains("wide.localhost").then_some(config)
    })
    .await;
    let writes = caddy.config_writes();
    assert!(
        config.contains("\"name\":\"_a4.wide.svc.harbor.\"")
            && !config.contains("\"source\":\"multi\""),
        "a round-robin service should take one rotating window: {config}"
    );
    // Each answer names four instances; successive ones reach every instance.
    reaches_them_all(&caddy, &pool).await;
    assert_eq!(caddy.config_writes(), writes, "the window reloaded Caddy");
    let (_, backend) = h.get("/api/v1/backend").await;
    assert_eq!(backend["in_sync"], true, "{backend}");
    h.shutdown().await;
}

async fn a_service_with_more_instances_than_one_udp_answer_holds_reaches_them_all_over_tcp(
    release: Release,
) {
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    // Without the window, every instance is named in every refresh: over TCP.
    let r = h
        .client
        .put(h.url("/api/v1/backend"))
        .json(&json!({"adapter": "caddy", "config": {"aperture": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let pool = wide_service(&h).await;
    eventually(Duration::from_secs(10), "looked up over TCP", || async {
        let config = caddy_config(&caddy).await?;
        (config.contains("\"name\":\"wide.svc.harbor.\"") && config.contains("\"tcp/127.0.0.1:"))
            .then_some(())
    })
    .await;
    let writes = caddy.config_writes();
    // Caddy's round-robin over the one answer that names them all reaches every instance.
    reaches_them_all(&caddy, &pool).await;
    assert_eq!(caddy.config_writes(), writes, "growth reloaded Caddy");
    let (_, backend) = h.get("/api/v1/backend").await;
    assert_eq!(backend["in_sync"], true, "{backend}");
    h.shutdown().await;
}

async fn caddys_admin_api_on_a_unix_socket(release: Release) {
    let _turn = common::MACHINE.read().await;
    let Some(caddy) = Caddy::start_with_unix_admin(release).await else {
        return;
    };
    assert!(caddy.admin_url().starts_with("unix:/"));
    let h = harbor_for(&caddy).await;
    let web = Upstream::start("web").await;
    h.write_route(
        "web.route",
        &format!("host = \"web.localhost\"\nupstreams = [\"{}\"]\n", web.addr),
    );
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(3)).await;
    user_route_works(&caddy).await;
    // Caddy serves what it was given as soon as it loads it; Harbor counts the apply once
    // Caddy's answer is back.
    eventually(Duration::from_secs(5), "the apply counted", || async {
        let status = backend_status(&h).await;
        (status["in_sync"] == true && status["applies"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    std::fs::remove_file(h.routes.path().join("web.route")).expect("remove route");
    until_gone(&caddy, "web.localhost", Duration::from_secs(3)).await;
    h.shutdown().await;
}

async fn caddy_keeps_routing_while_harbor_is_stopped_and_restarted(release: Release) {
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    // A service asked for in windows (round-robin, over UDP), and one that needs all of its 60
    // instances in one answer (hashing, over TCP): more than one UDP answer holds.
    let _web = web_routed(&caddy, &h).await;
    let mut pool = Vec::new();
    for i in 0..60 {
        pool.push(Upstream::start(&format!("hashed-{i}")).await);
    }
    // One route file, one change: Caddy's static list holds every instance from the first
    // write, so nothing lags at the stop. (A list that lags is refreshed at shutdown, and that
    // reload closes keep-alive connections: what it costs clients is in host/benches/README.md,
    // Backends: registration to routable.)
    let upstreams: Vec<String> = pool.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    h.write_route(
        "hashed.route",
        &format!(
            "host = \"hashed.localhost\"\nstrategy = \"consistent-hash\"\nupstreams = [{}]\n",
            upstreams.join(", ")
        ),
    );
    eventually(
        Duration::from_secs(10),
        "hashed routed over TCP",
        || async {
            let config = caddy_config(&caddy).await?;
            config
                .contains("\"name\":\"hashed.svc.harbor.\"")
                .then_some(())
        },
    )
    .await;
    until_routed(&caddy, "web.localhost", "web", Duration::from_secs(3)).await;
    let addr = caddy.listen_addr();
    let (stop, stream) = steady_stream(vec![
        (addr, "web.localhost", "web"),
        (addr, "hashed.localhost", "hashed-"),
    ]);
    let streaming = std::time::Instant::now();
    // How long the test's own runtime, which the daemon shares, was kept from running: a long
    // stall while Harbor stops would be Harbor blocking its runtime.
    let stalled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watchdog = tokio::spawn({
        let stalled = stalled.clone();
        async move {
            loop {
                let before = std::time::Instant::now();
                tokio::time::sleep(Duration::from_millis(20)).await;
                let late = before.elapsed().as_millis() as u64;
                stalled.fetch_max(late, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = caddy.config_writes();

    let h = h.restart_after(Duration::from_secs(10)).await;
    let restarted = streaming.elapsed();
    let in_sync = || async {
        let (_, status) = h.get("/api/v1/backend").await;
        (status["in_sync"] == true).then_some(())
    };
    eventually(Duration::from_secs(10), "Caddy in step again", in_sync).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let (ok, failed) = stream.await.expect("the stream");
    watchdog.abort();
    eprintln!(
        "the test's runtime went at most {} ms between 20 ms ticks",
        stalled.load(std::sync::atomic::Ordering::Relaxed)
    );
    if !failed.is_empty() {
        let log = std::fs::read_to_string(caddy.dir.path().join("caddy.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        eprintln!("Caddy's log, last lines first:\n{}", tail.join("\n"));
    }
    none_failed(
        &format!(
            "Caddy {}: a stop of 10 s from 0.5 s into the stream and a restart done at {:.2} s \
             ({} config writes meanwhile)",
            caddy.version,
            restarted.as_secs_f64(),
            caddy.config_writes() - writes
        ),
        ok,
        &failed,
    );
    // The lists were current, so neither the stop nor the restart rewrote anything.
    assert_eq!(
        caddy.config_writes(),
        writes,
        "the stop or the restart reloaded Caddy"
    );
    let log = std::fs::read_to_string(caddy.dir.path().join("caddy.log")).expect("caddy.log");
    assert!(
        log.contains("falling back to static upstreams"),
        "Caddy never served from its static lists"
    );
    h.shutdown().await;
}

async fn a_health_checked_route_on_a_host_name_upstream_blocks_nothing(release: Release) {
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    let checked = Upstream::start("checked").await;
    h.write_route(
        "checked.route",
        &format!(
            "host = \"checked.localhost\"\nupstreams = [\"localhost:{}\"]\n\n[health]\npath = \"/\"\ninterval = \"1s\"\n",
            checked.addr.port()
        ),
    );
    until_routed(
        &caddy,
        "checked.localhost",
        "checked",
        Duration::from_secs(5),
    )
    .await;
    let web = web_routed(&caddy, &h).await;
    drop(web);
    let (_, errors) = h.get("/api/v1/route-errors").await;
    assert_eq!(errors["refused"], json!([]), "{errors}");

    // Tell the adapter this Caddy is newer than it is: on 2.6 the health thresholds it then
    // writes are refused. The refusal is that one service's, named, and the rest still apply.
    let r = h
        .client
        .put(h.url("/api/v1/backend"))
        .json(&json!({"adapter": "caddy", "config": {"version": "v2.11.0"}}))
        .send()
        .await
        .expect("swap");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let late = Upstream::start("late").await;
    h.register(json!({"name": "late", "upstream": late.addr.to_string(), "ttl_secs": 60, "host": "late.localhost"}))
        .await;
    until_routed(&caddy, "late.localhost", "late", Duration::from_secs(5)).await;
    let (_, errors) = h.get("/api/v1/route-errors").await;
    let refused = errors["refused"].as_array().expect("a list").clone();
    if release == Release::Debian {
        assert_eq!(refused.len(), 1, "{errors}");
        assert_eq!(refused[0]["service"], "checked");
        let reason = refused[0]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("passes") || reason.contains("fails"),
            "{reason}"
        );
        let metrics = h.metrics().await;
        assert!(
            metrics.contains("harbor_backend_refused_services 1"),
            "{metrics}"
        );
        // The rest is applied (`late` routes), but not all of the state is live.
        let (_, status) = h.get("/api/v1/backend").await;
        assert_eq!(status["in_sync"], false, "{status}");
        let error = status["last_error"].as_str().unwrap_or_default();
        assert!(error.contains("checked"), "{status}");
    } else {
        assert!(refused.is_empty(), "{errors}");
        until_routed(
            &caddy,
            "checked.localhost",
            "checked",
            Duration::from_secs(3),
        )
        .await;
    }
    h.shutdown().await;
}

/// `hash_key` by header and by cookie reaches Caddy: each session stays on one upstream.
async fn a_header_or_cookie_hash_key_keeps_a_session_on_one_upstream(release: Release) {
    let Some((_turn, caddy, h)) = caddy_and_harbor(release).await else {
        return;
    };
    common::hash_keys_keep_sessions_on_one_upstream(&h, caddy.listen_addr()).await;
    h.shutdown().await;
}

// Every test above, once against each Caddy release.
common::on_each_caddy!(
    files_and_registrations_reach_caddy_and_leave_it,
    a_restarted_caddy_gets_harbors_routes_back,
    routes_registered_during_a_long_caddy_outage_arrive_soon_after_it_ends,
    a_restart_of_harbor_leaves_caddys_configuration_as_it_was,
    a_hand_edit_of_harbors_route_is_repaired,
    harbor_starts_with_caddy_down_and_converges_when_it_comes_up,
    bad_swaps_are_refused_and_the_old_adapter_keeps_serving,
    swapping_the_caddy_adapter_twenty_times_under_load_fails_no_request,
    switching_between_caddy_and_envoy_leaves_nothing_of_the_other_behind,
    an_adapter_that_traps_or_spins_is_refused_and_reported,
    instance_churn_does_not_reload_caddy_or_hurt_a_loaded_service,
    an_adapter_dropped_in_the_plugin_directory_takes_over,
    harbors_health_checks_steer_caddys_dynamic_upstreams,
    a_dead_instance_costs_round_robin_clients_nothing_without_passive_checks,
    a_big_round_robin_service_rotates_a_window_through_all_its_instances,
    a_service_with_more_instances_than_one_udp_answer_holds_reaches_them_all_over_tcp,
    caddy_keeps_routing_while_harbor_is_stopped_and_restarted,
    a_health_checked_route_on_a_host_name_upstream_blocks_nothing,
    caddys_admin_api_on_a_unix_socket,
    the_pushed_config_and_dry_runs_show_what_is_written_and_write_nothing,
    a_caddy_reload_never_answers_harbors_hosts_wrongly,
    a_header_or_cookie_hash_key_keeps_a_session_on_one_upstream,
);
