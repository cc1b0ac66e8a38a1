//! Plugins through the daemon: the list, uploads (checked before they serve), the plugin
//! directory followed live, strategy changes at runtime, and unknown strategies refused.

use crate::common;

use std::time::Duration;

use common::guests::{component, variant};
use common::{eventually, start, start_with};
use harbor::model::ServiceName;
use serde_json::{Value, json};

/// Uploads a component and waits for its check (`?wait=true`).
async fn upload(
    h: &common::TestHarbor,
    name: &str,
    bytes: Vec<u8>,
    content_type: &str,
) -> (u16, Value) {
    let resp = h
        .client
        .put(h.url(&format!("/api/v1/plugins/{name}?wait=true")))
        .header("content-type", content_type)
        .body(bytes)
        .send()
        .await
        .expect("the API answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Uploads the misbehaving test strategy, which passes its checks.
async fn upload_misbehaving(h: &common::TestHarbor) {
    let bytes = component("harbor-test-misbehaving", &[]);
    let (status, body) = upload(h, "misbehaving", bytes, "application/wasm").await;
    assert_eq!(status, 201, "{body}");
}

/// A daemon following a plugin directory of its own, rescanned every 200 ms as well.
async fn start_with_plugin_dir() -> (common::TestHarbor, tempfile::TempDir) {
    let plugins = tempfile::tempdir().expect("a plugin directory");
    let configured = plugins.path().to_owned();
    let h = start_with(move |c| {
        c.plugins_dir = Some(configured.clone());
        c.rescan_interval = Some(Duration::from_millis(200));
    })
    .await;
    (h, plugins)
}

fn plugin<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

#[tokio::test]
async fn builtins_are_listed_and_uploads_are_checked_before_they_serve() {
    let h = start().await;
    let (status, list) = h.get("/api/v1/plugins").await;
    assert_eq!(status, 200);
    for name in [
        "round-robin",
        "weighted-round-robin",
        "random",
        "least-connections",
        "least-request",
        "consistent-hash",
        "first",
        "peak-ewma",
    ] {
        let p = plugin(&list, name).unwrap_or_else(|| panic!("{name} not listed: {list}"));
        assert_eq!(p["source"], "builtin");
        assert_eq!(p["state"], "active");
        assert_eq!(p["kind"], "strategy");
        assert_eq!(p["hash"].as_str().map(str::len), Some(64));
    }

    let mut events = h.events(None).await;
    events.next().await;
    let canary = component("strategy-example-canary", &[]);
    let (status, body) = upload(&h, "example-canary", canary.clone(), "application/wasm").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["name"], "example-canary");
    assert_eq!(body["source"], "api");
    assert_eq!(
        events.next_of("plugin_loaded").await.data["name"],
        "example-canary"
    );

    // A service may now use it, and an instance's metadata reaches the strategy as labels.
    h.register(json!({"name": "web", "upstream": "127.0.0.1:9001", "strategy": "example-canary", "meta": {"track": "canary"}}))
        .await;
    let (status, err) = h
        .post(
            "/api/v1/services",
            json!({"name": "web2", "upstream": "127.0.0.1:9002", "strategy": "no-such"}),
        )
        .await;
    assert_eq!(
        (status, err["field"].as_str()),
        (400, Some("strategy")),
        "{err}"
    );

    // Garbage under the same name is refused and the good version keeps serving.
    let (status, err) = upload(
        &h,
        "example-canary",
        b"garbage".to_vec(),
        "application/wasm",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["field"], "component");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly component"),
        "{err}"
    );
    assert!(events.next_of("plugin_rejected").await.data["reason"].is_string());
    let (_, list) = h.get("/api/v1/plugins").await;
    let p = plugin(&list, "example-canary").unwrap();
    assert_eq!(p["state"], "active");
    assert!(
        p["last_error"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly"),
        "{p}"
    );
    let balancer = h
        .harbor()
        .routing()
        .balancer(&ServiceName::parse("web").unwrap())
        .unwrap();
    common::strategy_ready(&balancer);
    assert!(!balancer.pick(None, &[]).unwrap().fallback);

    // The same bytes again: 200, not 201.
    assert_eq!(
        upload(&h, "example-canary", canary.clone(), "application/wasm")
            .await
            .0,
        200
    );
    assert_eq!(
        upload(&h, "example-canary", canary, "text/plain").await.0,
        415
    );
    let (status, err) = upload(
        &h,
        "canary",
        component("strategy-example-canary", &[]),
        "application/wasm",
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        err["error"].as_str().unwrap().contains("describes itself"),
        "{err}"
    );

    // Custom strategies can be removed, built-ins cannot.
    let del = h
        .client
        .delete(h.url("/api/v1/plugins/round-robin"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 409);
    let del = h
        .client
        .delete(h.url("/api/v1/plugins/example-canary"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    events.next_of("plugin_removed").await;
    // The route keeps working on the host's round-robin.
    assert!(balancer.pick(None, &[]).unwrap().fallback);
    h.shutdown().await;
}

#[tokio::test]
async fn a_services_strategy_changes_at_runtime() {
    let h = start().await;
    h.write_route(
        "api.route",
        "upstreams = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\nstrategy = \"round-robin\"\n",
    );
    eventually(Duration::from_secs(1), "route loaded", || async {
        h.service("api").await
    })
    .await;
    let name = ServiceName::parse("api").unwrap();
    let routing = h.harbor().routing().clone();
    eventually(Duration::from_secs(1), "balancer built", || {
        let routing = routing.clone();
        let name = name.clone();
        async move { routing.balancer(&name) }
    })
    .await;

    let resp = h
        .client
        .put(h.url("/api/v1/services/api/strategy"))
        .json(&json!({"strategy": "first"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["strategy"], "first");
    eventually(Duration::from_millis(500), "balancer switched", || {
        let routing = routing.clone();
        let name = name.clone();
        async move { (routing.balancer(&name)?.strategy_name() == "first").then_some(()) }
    })
    .await;
    let b = routing.balancer(&name).unwrap();
    assert!((0..6).all(|_| b.pick(None, &[]).unwrap().index == 0));

    // The override lasts through rescans of an unchanged file: once another file has been
    // picked up, the whole directory has been read again.
    h.write_route("other.route", "upstreams = [\"127.0.0.1:9003\"]\n");
    eventually(Duration::from_secs(1), "rescan", || async {
        h.service("other").await
    })
    .await;
    assert_eq!(h.service("api").await.unwrap()["strategy"], "first");

    let bad = h
        .client
        .put(h.url("/api/v1/services/api/strategy"))
        .json(&json!({"strategy": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let missing = h
        .client
        .put(h.url("/api/v1/services/ghost/strategy"))
        .json(&json!({"strategy": "first"}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    h.shutdown().await;
}

#[tokio::test]
async fn a_route_file_naming_an_unknown_strategy_is_reported_and_the_last_good_version_kept() {
    let h = start().await;
    h.write_route(
        "svc.route",
        "upstreams = [\"127.0.0.1:9001\"]\nstrategy = \"random\"\n",
    );
    eventually(Duration::from_secs(1), "route loaded", || async {
        h.service("svc").await
    })
    .await;
    h.write_route(
        "svc.route",
        "upstreams = [\"127.0.0.1:9002\"]\nstrategy = \"fancy\"\n",
    );
    let err = eventually(Duration::from_secs(1), "error reported", || async {
        let (_, body) = h.get("/api/v1/route-errors").await;
        body["errors"].as_array().and_then(|e| e.first().cloned())
    })
    .await;
    assert_eq!(err["field"], "strategy");
    assert_eq!(err["line"], 2);
    let svc = h.service("svc").await.unwrap();
    assert_eq!(svc["strategy"], "random");
    assert_eq!(svc["upstreams"][0]["addr"], "127.0.0.1:9001");
    h.shutdown().await;
}

#[tokio::test]
async fn the_plugin_directory_is_read_at_start_and_followed_live() {
    let plugins = tempfile::tempdir().unwrap();
    let dir = plugins.path().to_owned();
    let file = dir.join("dyn.wasm");
    std::fs::write(&file, component("harbor-test-swapper", &[])).unwrap();
    let configured = dir.clone();
    let h = start_with(move |c| c.plugins_dir = Some(configured.clone())).await;
    let listed = |version: &'static str| {
        let h = &h;
        move || async move {
            let (_, list) = h.get("/api/v1/plugins").await;
            (plugin(&list, "swapper")?["version"] == version).then_some(())
        }
    };
    let (_, list) = h.get("/api/v1/plugins").await;
    let p = plugin(&list, "swapper").unwrap_or_else(|| panic!("not loaded at start: {list}"));
    assert_eq!(p["version"], "1");
    assert!(p["source"].as_str().unwrap().ends_with("dyn.wasm"), "{p}");
    // A route file may name it, since plugins load before routes.
    h.write_route(
        "swapped.route",
        "upstreams = [\"127.0.0.1:9001\"]\nstrategy = \"swapper\"\n",
    );
    eventually(Duration::from_secs(1), "route using the plugin", || async {
        h.service("swapped").await
    })
    .await;

    // Changed (written elsewhere and renamed in, as deploy tools do): swapped.
    let tmp = dir.join(".dyn.tmp");
    std::fs::write(&tmp, component("harbor-test-swapper", &["second"])).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    eventually(
        common::COMPILE_WITHIN,
        "changed plugin swapped",
        listed("2"),
    )
    .await;

    // A broken file is reported and hurts nothing else.
    std::fs::write(dir.join("broken.wasm"), b"not a component").unwrap();
    let rejected = eventually(Duration::from_secs(1), "broken plugin reported", || async {
        let (_, list) = h.get("/api/v1/plugins").await;
        list["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["state"] == "rejected")
            .cloned()
    })
    .await;
    assert!(
        rejected["source"]
            .as_str()
            .unwrap()
            .ends_with("broken.wasm"),
        "{rejected}"
    );
    eventually(
        Duration::from_secs(1),
        "good plugin unaffected",
        listed("2"),
    )
    .await;

    // Removed: unloaded, and its route falls back to the host's round-robin.
    std::fs::remove_file(&file).unwrap();
    eventually(
        Duration::from_secs(1),
        "removed plugin unloaded",
        || async {
            let (_, list) = h.get("/api/v1/plugins").await;
            plugin(&list, "swapper").is_none().then_some(())
        },
    )
    .await;
    let b = h
        .harbor()
        .routing()
        .balancer(&ServiceName::parse("swapped").unwrap())
        .unwrap();
    assert!(b.pick(None, &[]).unwrap().fallback);
    h.shutdown().await;
}

#[tokio::test]
async fn a_misbehaving_plugin_never_takes_the_daemon_down() {
    let h = start().await;
    let mut events = h.events(None).await;
    events.next().await;
    upload_misbehaving(&h).await;
    h.register(json!({"name": "fragile", "upstream": "127.0.0.1:9001", "strategy": "misbehaving"}))
        .await;
    h.register(json!({"name": "fragile", "upstream": "127.0.0.1:9002", "strategy": "misbehaving"}))
        .await;
    let name = ServiceName::parse("fragile").unwrap();
    let routing = h.harbor().routing().clone();
    let b = eventually(
        Duration::from_secs(1),
        "balancer with both upstreams",
        || {
            let (routing, name) = (routing.clone(), name.clone());
            async move {
                routing
                    .balancer(&name)
                    .filter(|b| b.backends().backends.len() == 2)
            }
        },
    )
    .await;

    // Picks run on the proxy's threads; here a blocking thread stands in for one.
    let picks = tokio::task::spawn_blocking(move || {
        [0xDEAD_0001u64, 0xDEAD_0002, 0xDEAD_0003, 0xDEAD_0004].map(|key| {
            // Each fault costs the thread its instance; a new one is made off the thread.
            common::strategy_ready(&b);
            b.pick(Some(key), &[]).map(|p| p.fallback)
        })
    })
    .await
    .unwrap();
    assert_eq!(
        picks,
        [Some(true); 4],
        "every pick is answered by the fallback"
    );

    for fault in ["timeout", "memory", "trap", "bad_answer"] {
        let e = events.next_of("plugin_fault").await;
        assert_eq!(e.data["fault"], fault);
        assert_eq!(e.data["name"], "misbehaving");
    }
    assert_eq!(h.get("/healthz").await.0, 200);
    let metrics = h.metrics().await;
    for kind in ["timeout", "memory", "trap", "bad_answer"] {
        let line =
            format!("harbor_plugin_faults_total{{kind=\"{kind}\",plugin=\"misbehaving\"}} 1");
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line}\n{metrics}"
        );
    }
    // Still registering, still listing.
    h.register(json!({"name": "after", "upstream": "127.0.0.1:9003"}))
        .await;
    let (_, list) = h.get("/api/v1/plugins").await;
    assert_eq!(plugin(&list, "misbehaving").unwrap()["faults"], 4);
    h.shutdown().await;
}

/// A component over the size limit is refused, by upload and from the plugin directory alike,
/// with the limit named: a JSON `413`, or a `plugin_rejected` event and an entry in the list.
#[tokio::test]
async fn a_component_over_the_size_limit_is_refused_with_the_limit_named() {
    let (h, plugins) = start_with_plugin_dir().await;
    let dir = plugins.path().to_owned();
    let mut events = h.events(None).await;
    // Only the head: the answer comes before any of the body, as it would for a client that
    // waits for `100 Continue`.
    let mut conn = tokio::net::TcpStream::connect(h.harbor().api_addr().expect("api"))
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(
        format!(
            "PUT /api/v1/plugins/huge HTTP/1.1\r\nHost: x\r\nContent-Type: application/wasm\r\nContent-Length: {}\r\n\r\n",
            (32 << 20) + 1
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut answer = vec![0u8; 4096];
    let n = conn.read(&mut answer).await.expect("an answer");
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("application/json"), "{answer}");
    assert!(answer.contains("33554432 bytes"), "{answer}");
    drop(conn);

    let file = std::fs::File::create(dir.join("huge.wasm")).unwrap();
    file.set_len((32 << 20) + 1).unwrap();
    drop(file);
    let rejected = events.next_of("plugin_rejected").await;
    assert!(
        rejected.data["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("at most 33554432 bytes"),
        "{:?}",
        rejected.data
    );
    let (_, list) = h.get("/api/v1/plugins").await;
    let listed = list["plugins"].as_array().into_iter().flatten().any(|p| {
        p["state"] == "rejected"
            && p["source"]
                .as_str()
                .unwrap_or_default()
                .ends_with("huge.wasm")
    });
    assert!(listed, "{list}");
    h.shutdown().await;
}

/// A strategy whose `rebuild` loops is set up off the proxy's threads: the stuck setup runs on
/// the strategy setup thread (its fault says where), and the other route keeps completing
/// requests while it is stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_that_loops_never_holds_up_a_picking_thread() {
    let h = start().await;
    let mut events = h.events(None).await;
    upload_misbehaving(&h).await;
    let fine = common::proxies::Upstream::start("fine").await;
    let fragile = common::proxies::Upstream::start("fragile").await;
    h.register(json!({"name": "fine", "upstream": fine.addr.to_string(), "host": "fine.localhost", "ttl_secs": 60}))
        .await;
    h.register(json!({"name": "fragile", "upstream": fragile.addr.to_string(), "host": "fragile.localhost", "strategy": "misbehaving", "ttl_secs": 60}))
        .await;
    let proxy = h.harbor().proxy_addr().expect("the proxy");
    let client = reqwest::Client::new();
    for (host, want) in [("fine.localhost", "fine"), ("fragile.localhost", "fragile")] {
        eventually(Duration::from_secs(5), host, || {
            let client = client.clone();
            async move {
                let got = common::proxies::through(&client, proxy, host, "/").await;
                (got == Some((200, want.to_owned()))).then_some(())
            }
        })
        .await;
    }

    // A backend on the magic port: the guest's rebuild of the route loops.
    h.register(json!({"name": "fragile", "upstream": "127.0.0.1:6666", "host": "fragile.localhost", "strategy": "misbehaving", "ttl_secs": 60}))
        .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            let (mut fine_ok, mut slowest) = (0u32, Duration::ZERO);
            while !stop.is_cancelled() {
                // Fragile's picks are what ask for the rebuild.
                let _ = common::proxies::through(&client, proxy, "fragile.localhost", "/").await;
                let began = std::time::Instant::now();
                let got = common::proxies::through(&client, proxy, "fine.localhost", "/").await;
                assert_eq!(
                    got,
                    Some((200, "fine".to_owned())),
                    "the other route failed"
                );
                slowest = slowest.max(began.elapsed());
                fine_ok += 1;
            }
            (fine_ok, slowest)
        }
    });
    let fault = events.next_of("plugin_fault").await;
    stop.cancel();
    let (fine_ok, slowest) = traffic.await.expect("the traffic");
    eprintln!(
        "while the rebuild was stuck: {fine_ok} requests to the other route, slowest {slowest:?}"
    );
    let message = fault.data["message"].as_str().unwrap_or_default();
    assert_eq!(fault.data["fault"], "timeout", "{:?}", fault.data);
    assert!(
        message.contains("harbor-strategy-setup") && !message.contains("harbor-lane"),
        "{message}"
    );
    // Every plugin setup in this process so far, this one's and other tests', ran off the
    // picking threads.
    let threads = harbor::plugins::setup_threads();
    assert!(
        threads.get("harbor-strategy-setup").is_some_and(|n| *n > 0)
            && !threads.contains_key("harbor-lane"),
        "plugin setups by thread: {threads:?}"
    );
    assert!(
        fine_ok > 0,
        "the other route completed nothing while the rebuild was stuck"
    );
    h.shutdown().await;
}

/// An upload is answered before it is compiled: `202` with the plugin listed as compiling,
/// then `plugin_compiling` and `plugin_loaded`, while the version in force keeps serving. What
/// can be told without compiling is a `400` at once, and limits are set with the upload.
#[tokio::test]
async fn an_upload_is_answered_at_once_and_compiled_off_the_request() {
    let h = start().await;
    let swapper = component("harbor-test-swapper", &[]);
    let (status, body) = upload(&h, "swapper", swapper.clone(), "application/wasm").await;
    assert_eq!(status, 201, "{body}");
    let first_hash = body["hash"].clone();
    let mut events = h.events(None).await;

    // Never compiled before in this process: its bytes are new.
    let next = variant(&swapper, 7001);
    let put = |bytes: Vec<u8>, query: &str| {
        h.client
            .put(h.url(&format!("/api/v1/plugins/swapper{query}")))
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
    };
    let resp = put(next.clone(), "").await.expect("the API answers");
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(
        resp.headers()["location"].to_str().unwrap(),
        "/api/v1/plugins/swapper"
    );
    let body: Value = resp.json().await.unwrap();
    // The version in force is listed, and serves, until the new one passes.
    assert_eq!(body["state"], "active", "{body}");
    assert_eq!(body["hash"], first_hash, "{body}");
    let pending = body["compiling"]["hash"].clone();
    assert!(pending.is_string() && pending != first_hash, "{body}");

    let compiling = events.next_of("plugin_compiling").await;
    assert_eq!(compiling.data["name"], "swapper");
    assert_eq!(compiling.data["hash"], pending);
    let loaded = events.next_of("plugin_loaded").await;
    assert_eq!(loaded.data["hash"], pending, "{:?}", loaded.data);
    let (_, list) = h.get("/api/v1/plugins").await;
    let p = plugin(&list, "swapper").expect("listed");
    assert_eq!(p["hash"], pending);
    assert!(p.get("compiling").is_none(), "{p}");

    // Refused at once, none of them compiled: not WebAssembly, a core module, a component of
    // another contract version, limits out of bounds, a misspelt limit.
    let wrong = component("harbor-test-wrong-version", &[]);
    for (bytes, query, needle) in [
        (
            b"definitely not wasm".to_vec(),
            "",
            "not WebAssembly at all",
        ),
        (b"\0asm\x01\0\0\0".to_vec(), "", "core module"),
        (wrong, "", "this Harbor speaks harbor:strategy@0.5.0"),
        (
            swapper.clone(),
            "?instances=0",
            "instances: 0 is outside 1 to 256",
        ),
        (swapper.clone(), "?memory=64MB", "use KiB, MiB or GiB"),
        (swapper.clone(), "?memroy=64MiB", "memroy"),
    ] {
        let resp = put(bytes, query).await.expect("the API answers");
        assert_eq!(resp.status().as_u16(), 400, "{needle}");
        let body: Value = resp.json().await.unwrap();
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{needle}: {body}");
    }
    // The next compile the daemon tells of is the next good upload's, with its limits.
    let resp = put(
        variant(&swapper, 7002),
        "?memory=64MiB&instances=40&pick_budget=2ms",
    )
    .await
    .expect("the API answers");
    assert_eq!(resp.status().as_u16(), 202);
    let body: Value = resp.json().await.unwrap();
    let compiling = events.next_of("plugin_compiling").await;
    assert_eq!(compiling.data["hash"], body["compiling"]["hash"]);
    events.next_of("plugin_loaded").await;
    let (_, list) = h.get("/api/v1/plugins").await;
    let limits = &plugin(&list, "swapper").expect("listed")["limits"];
    assert_eq!(limits["memory_bytes"], 64 << 20, "{limits}");
    assert_eq!(limits["instances"], 40, "{limits}");
    assert_eq!(limits["pick_budget_ms"], 2.0, "{limits}");
    assert_eq!(limits["pick_deadline_ms"], 20.0, "{limits}");
    h.shutdown().await;
}

/// A plugin's limits come from `NAME.toml` beside it. One that makes more core instances than
/// its limit is refused with the limit named and how to raise it; raised, it loads.
#[tokio::test]
async fn a_sidecar_file_sets_a_plugins_limits_and_a_refusal_names_them() {
    let (h, plugins) = start_with_plugin_dir().await;
    let dir = plugins.path().to_owned();
    let mut events = h.events(None).await;
    common::write_atomically(&dir.join("swapper.toml"), "instances = 1\n");
    common::write_bytes_atomically(
        &dir.join("swapper.wasm"),
        &component("harbor-test-swapper", &[]),
    );
    let rejected = events.next_of("plugin_rejected").await;
    let reason = rejected.data["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("more core instances than allowed")
            && reason.contains("its instances limit is 1")
            && reason.contains("raise it with `instances = 2` in")
            && reason.contains("swapper.toml"),
        "{reason}"
    );

    // A misspelt key is named, with the file.
    common::write_atomically(&dir.join("swapper.toml"), "instance = 40\n");
    let rejected = events.next_of("plugin_rejected").await;
    let reason = rejected.data["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("swapper.toml") && reason.contains("unknown field `instance`"),
        "{reason}"
    );

    common::write_atomically(
        &dir.join("swapper.toml"),
        "instances = 40\nmemory = \"48 MiB\"\npick_deadline = \"50ms\"\n",
    );
    events.next_of("plugin_loaded").await;
    let (_, list) = h.get("/api/v1/plugins").await;
    let p = plugin(&list, "swapper").expect("listed");
    assert_eq!(p["state"], "active", "{p}");
    assert_eq!(p["limits"]["instances"], 40, "{p}");
    assert_eq!(p["limits"]["memory_bytes"], 48 << 20, "{p}");
    assert_eq!(p["limits"]["pick_deadline_ms"], 50.0, "{p}");
    h.shutdown().await;
}

/// Labels on a route file's upstreams reach the strategy: the test strategy answers no backend
/// for a route whose upstream is labelled `misbehave = "none"`, a fault the host covers with its
/// own pick, so the request still succeeds.
#[tokio::test]
async fn labels_on_a_route_files_upstreams_reach_the_strategy() {
    let h = start().await;
    upload_misbehaving(&h).await;
    let mut events = h.events(None).await;
    let upstream = common::proxies::Upstream::start("labelled").await;
    h.write_route(
        "labelled.route",
        &format!(
            "host = \"labelled.localhost\"\nstrategy = \"misbehaving\"\nupstreams = [{{ addr = \"{}\", labels = {{ misbehave = \"none\" }} }}]\n",
            upstream.addr
        ),
    );
    let proxy = h.harbor().proxy_addr().expect("the proxy");
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let fault = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no fault from the labelled route"
        );
        let got = common::proxies::through(&client, proxy, "labelled.localhost", "/").await;
        if got.as_ref().is_some_and(|(status, _)| *status != 404) {
            assert_eq!(got, Some((200, "labelled".to_owned())));
        }
        if let Some(e) = events.next_within(Duration::from_millis(50)).await
            && e.event == "plugin_fault"
        {
            break e;
        }
    };
    assert_eq!(fault.data["fault"], "bad_answer", "{:?}", fault.data);
    assert_eq!(fault.data["name"], "misbehaving");
    h.shutdown().await;
}

/// A shadow strategy picks beside the live one on every first try: how often the two agree and
/// where each would send requests show in the service's view and in `/metrics`, while requests
/// go where the live strategy sends them. A shadow that faults changes nothing for them either.
#[tokio::test]
async fn a_shadow_strategy_is_compared_and_never_routes() {
    let h = start().await;
    let upstreams = [
        common::proxies::Upstream::start("a").await,
        common::proxies::Upstream::start("b").await,
        common::proxies::Upstream::start("c").await,
    ];
    for u in &upstreams {
        h.register(json!({"name": "web", "upstream": u.addr.to_string(), "host": "web.localhost", "ttl_secs": 60, "meta": {"misbehave": "panic"}}))
            .await;
    }
    let routing = h.harbor().routing().clone();
    let web = ServiceName::parse("web").unwrap();
    eventually(Duration::from_secs(5), "all three instances routed", || {
        let (routing, web) = (routing.clone(), web.clone());
        async move {
            routing
                .balancer(&web)
                .filter(|b| b.backends().backends.len() == 3)
        }
    })
    .await;
    let proxy = h.harbor().proxy_addr().expect("the proxy");
    let client = reqwest::Client::new();
    let put = |body: Value| {
        h.client
            .put(h.url("/api/v1/services/web/strategy"))
            .json(&body)
            .send()
    };
    // Refused before anything changes.
    for (body, needle) in [
        (
            json!({}),
            "give `strategy`, `strategy_settings`, `shadow`, or several",
        ),
        (
            json!({"shadow": "nonesuch"}),
            "no strategy named \"nonesuch\"",
        ),
        (json!({"shadow": "round-robin"}), "is the live strategy"),
        (
            json!({"strategy": "first", "shadow": "first"}),
            "is the live strategy",
        ),
    ] {
        let resp = put(body.clone()).await.expect("the API answers");
        assert_eq!(resp.status().as_u16(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert!(
            err["error"].as_str().unwrap_or_default().contains(needle),
            "{body}: {err}"
        );
    }
    let resp = put(json!({"shadow": "first"}))
        .await
        .expect("the API answers");
    assert_eq!(resp.status().as_u16(), 200);
    let view: Value = resp.json().await.unwrap();
    assert_eq!(view["strategy"], "round-robin", "{view}");
    assert_eq!(view["shadow"]["strategy"], "first", "{view}");

    let mut served = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..30 {
        let (status, body) = common::proxies::through(&client, proxy, "web.localhost", "/")
            .await
            .expect("an answer");
        assert_eq!(status, 200);
        *served.entry(body).or_default() += 1;
    }
    // Round-robin still decides: ten each.
    assert_eq!(
        served.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{served:?}"
    );
    let (_, view) = h.get("/api/v1/services/web").await;
    let shadow = &view["shadow"];
    assert_eq!(shadow["picks"], 30, "{shadow}");
    assert_eq!(shadow["agreed"], 10, "{shadow}");
    let shares = shadow["upstreams"].as_array().expect("shares");
    let live: Vec<u64> = shares.iter().map(|u| u["live"].as_u64().unwrap()).collect();
    let mut would: Vec<u64> = shares
        .iter()
        .map(|u| u["shadow"].as_u64().unwrap())
        .collect();
    would.sort();
    assert_eq!(live, [10, 10, 10], "{shadow}");
    assert_eq!(would, [0, 0, 30], "{shadow}");
    let metrics = h.metrics().await;
    for line in [
        "harbor_strategy_shadow_picks_total{outcome=\"agree\",service=\"web\",shadow=\"first\"} 10",
        "harbor_strategy_shadow_picks_total{outcome=\"disagree\",service=\"web\",shadow=\"first\"} 20",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line}\n{metrics}"
        );
    }

    // A shadow that panics on every pick: its faults are its own.
    upload_misbehaving(&h).await;
    let mut events = h.events(None).await;
    let resp = put(json!({"shadow": "misbehaving"}))
        .await
        .expect("the API answers");
    assert_eq!(resp.status().as_u16(), 200);
    // Until the shadow's instance is made (on the one setup thread, which other tests' plugins
    // may hold for a while) it does not pick: requests go on until its first fault.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut faults = 0;
    while faults == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the shadow's panics were not reported"
        );
        let (status, body) = common::proxies::through(&client, proxy, "web.localhost", "/")
            .await
            .expect("an answer");
        assert_eq!(status, 200, "{body}");
        while let Some(e) = events.next_within(Duration::from_millis(1)).await {
            faults += u32::from(e.event == "plugin_fault");
        }
    }
    let (_, view) = h.get("/api/v1/services/web").await;
    assert_eq!(view["shadow"]["strategy"], "misbehaving", "{view}");
    assert_eq!(view["shadow"]["agreed"], 0, "{view}");

    let resp = put(json!({"shadow": null})).await.expect("the API answers");
    assert_eq!(resp.status().as_u16(), 200);
    let (_, view) = h.get("/api/v1/services/web").await;
    assert!(view.get("shadow").is_none(), "{view}");
    h.shutdown().await;
}

/// Each way a pick can misbehave without trapping the host, in a daemon serving two routes:
/// the hostile guest serves one (its upstreams labelled to make every pick misbehave), the
/// other is the built-in round-robin. Requests go to both in turn from before the guest is
/// asked until its fault is reported, and for a hundred rounds after (the breaker's retries
/// included); not one of them fails, on either route.
async fn a_hostile_pick_costs_no_request(mode: &str, expect: impl Fn(&common::SseEvent) -> bool) {
    let h = start().await;
    upload_misbehaving(&h).await;
    let fine = common::proxies::Upstream::start("fine").await;
    let hostile = [
        common::proxies::Upstream::start("hostile").await,
        common::proxies::Upstream::start("hostile").await,
    ];
    h.register(json!({"name": "fine", "upstream": fine.addr.to_string(), "host": "fine.localhost", "ttl_secs": 60}))
        .await;
    let upstreams: Vec<String> = hostile
        .iter()
        .map(|u| {
            format!(
                "{{ addr = \"{}\", labels = {{ misbehave = \"{mode}\" }} }}",
                u.addr
            )
        })
        .collect();
    h.write_route(
        "hostile.route",
        &format!(
            "host = \"hostile.localhost\"\nstrategy = \"misbehaving\"\nupstreams = [{}]\n",
            upstreams.join(", ")
        ),
    );
    let proxy = h.harbor().proxy_addr().expect("the proxy");
    let client = reqwest::Client::new();
    for (host, want) in [("fine.localhost", "fine"), ("hostile.localhost", "hostile")] {
        eventually(Duration::from_secs(10), host, || {
            let client = client.clone();
            async move {
                let got = common::proxies::through(&client, proxy, host, "/").await;
                (got == Some((200, want.to_owned()))).then_some(())
            }
        })
        .await;
    }
    let mut events = h.events(None).await;
    let (mut answered, mut failed) = (0u32, Vec::new());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let reported = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "{mode}: never reported; {answered} requests answered, failed: {failed:?}"
        );
        for (host, want) in [("fine.localhost", "fine"), ("hostile.localhost", "hostile")] {
            match common::proxies::through(&client, proxy, host, "/").await {
                Some((200, body)) if body == want => answered += 1,
                other => failed.push(format!("{host}: {other:?}")),
            }
        }
        if let Some(e) = events.next_within(Duration::from_millis(1)).await
            && expect(&e)
        {
            break e;
        }
    };
    let until_reported = answered;
    for _ in 0..100 {
        for (host, want) in [("fine.localhost", "fine"), ("hostile.localhost", "hostile")] {
            match common::proxies::through(&client, proxy, host, "/").await {
                Some((200, body)) if body == want => answered += 1,
                other => failed.push(format!("{host}: {other:?}")),
            }
        }
    }
    eprintln!(
        "{mode}: {until_reported} requests answered until {:?}, {answered} in all",
        reported.data
    );
    assert!(failed.is_empty(), "{mode}: failed requests {failed:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn a_pick_over_its_budget_takes_the_plugin_out_of_service_and_costs_no_request() {
    a_hostile_pick_costs_no_request("slow", |e| {
        e.event == "plugin_disabled" && e.data["name"] == "misbehaving"
    })
    .await;
}

#[tokio::test]
async fn an_answer_of_no_backend_is_a_fault_and_costs_no_request() {
    a_hostile_pick_costs_no_request("none", |e| {
        e.event == "plugin_fault" && e.data["fault"] == "bad_answer"
    })
    .await;
}

#[tokio::test]
async fn a_panicking_pick_reports_its_message_and_costs_no_request() {
    a_hostile_pick_costs_no_request("panic", |e| {
        e.event == "plugin_fault"
            && e.data["fault"] == "trap"
            && e.data["message"]
                .as_str()
                .is_some_and(|m| m.contains("asked to panic"))
    })
    .await;
}
