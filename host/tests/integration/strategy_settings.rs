//! Per-route strategy settings, end to end: given by a registration or a route file, checked by
//! the strategy itself (a refusal carries its own reason), agreed on by every instance of a
//! service, and changed live. The example canary strategy shows them: `canary_percent` of 0
//! sends everything to the stable upstream, 100 everything to the one labelled `track=canary`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{self, TestHarbor, eventually, guests::component};

async fn with_canary() -> TestHarbor {
    let h = common::start().await;
    let (status, body) = upload_canary(&h, "wait=true").await;
    assert_eq!(status, 201, "{body}");
    h
}

/// Uploads the example canary strategy with `query`: the answer's status and body.
async fn upload_canary(h: &TestHarbor, query: &str) -> (u16, Value) {
    let resp = h
        .client
        .put(h.url(&format!("/api/v1/plugins/example-canary?{query}")))
        .header("content-type", "application/wasm")
        .body(component("strategy-example-canary", &[]))
        .send()
        .await
        .expect("the API answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Where 20 requests to `host` went, by upstream body.
async fn spread(h: &TestHarbor, host: &str) -> BTreeMap<String, u32> {
    let proxy = h.harbor().proxy_addr().expect("the proxy");
    let client = reqwest::Client::new();
    let mut seen = BTreeMap::new();
    for _ in 0..20 {
        if let Some((200, body)) = common::proxies::through(&client, proxy, host, "/").await {
            *seen.entry(body).or_default() += 1;
        }
    }
    seen
}

/// Waits until every one of 20 requests to `host` reaches `upstream`.
async fn all_reach(h: &TestHarbor, host: &str, upstream: &str) {
    let want = BTreeMap::from([(upstream.to_owned(), 20)]);
    eventually(
        Duration::from_secs(10),
        &format!("every request to {host} at {upstream}"),
        || {
            let want = want.clone();
            async move { (spread(h, host).await == want).then_some(()) }
        },
    )
    .await;
}

async fn put_strategy(h: &TestHarbor, service: &str, body: Value) -> (u16, Value) {
    let resp = h
        .client
        .put(h.url(&format!("/api/v1/services/{service}/strategy")))
        .json(&body)
        .send()
        .await
        .expect("the API answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_registrations_settings_are_checked_by_its_strategy_agreed_on_and_changed_live() {
    let h = with_canary().await;
    let stable = common::proxies::Upstream::start("stable").await;
    let canary = common::proxies::Upstream::start("canary").await;
    let instance = |upstream: &common::proxies::Upstream, settings: Value| {
        let track = if upstream.addr == canary.addr {
            "canary"
        } else {
            "stable"
        };
        json!({"name": "web", "upstream": upstream.addr.to_string(), "host": "web.localhost",
               "strategy": "example-canary", "strategy_settings": settings, "ttl_secs": 60,
               "meta": {"track": track}})
    };

    // Refused with the strategy's own words, and nothing registered.
    let (status, body) = h
        .post(
            "/api/v1/services",
            instance(&stable, json!({"canary_percent": 101})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "strategy_settings", "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("example-canary refuses these settings")
            && error.contains("\"canary_percent\" must be a whole number from 0 to 100, got 101"),
        "{body}"
    );
    let (status, body) = h
        .post("/api/v1/services", instance(&stable, json!(10)))
        .await;
    assert_eq!((status, &body["field"]), (400, &json!("strategy_settings")));
    assert!(h.service("web").await.is_none());

    h.register(instance(&stable, json!({"canary_percent": 0})))
        .await;
    // Every instance of a service carries the same settings.
    let (status, body) = h
        .post(
            "/api/v1/services",
            instance(&canary, json!({"canary_percent": 100})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["field"], "strategy_settings", "{body}");
    h.register(instance(&canary, json!({ "canary_percent": 0 })))
        .await;
    let service = h.service("web").await.expect("web");
    assert_eq!(service["strategy_settings"], json!({"canary_percent": 0}));
    all_reach(&h, "web.localhost", "stable").await;

    // Changed live: every request goes to the canary.
    let (status, body) = put_strategy(
        &h,
        "web",
        json!({"strategy_settings": {"canary_percent": 100}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["strategy_settings"], json!({"canary_percent": 100}));
    all_reach(&h, "web.localhost", "canary").await;

    // A refusal changes nothing; nor does a strategy that would refuse the route's settings.
    for body in [
        json!({"strategy_settings": {"canary_percent": "all"}}),
        json!({"strategy": "round-robin"}),
    ] {
        let (status, answer) = put_strategy(&h, "web", body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["field"], "strategy_settings", "{answer}");
    }
    let (_, answer) = put_strategy(&h, "web", json!({"strategy": "round-robin"})).await;
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("round-robin has no settings"),
        "{answer}"
    );
    assert_eq!(
        h.service("web").await.expect("web")["strategy"],
        "example-canary"
    );
    // A shadow picks under the route's settings too, so it must accept them.
    let (status, answer) = put_strategy(&h, "web", json!({"shadow": "round-robin"})).await;
    assert_eq!(
        (status, &answer["field"]),
        (400, &json!("shadow")),
        "{answer}"
    );
    assert!(h.service("web").await.expect("web").get("shadow").is_none());
    all_reach(&h, "web.localhost", "canary").await;

    // Both at once, and `{}` removes the settings.
    let (status, body) = put_strategy(
        &h,
        "web",
        json!({"strategy": "round-robin", "strategy_settings": {}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("strategy_settings").is_none(), "{body}");
    eventually(Duration::from_secs(10), "round-robin over both", || async {
        let seen = spread(&h, "web.localhost").await;
        (seen.get("stable") == Some(&10) && seen.get("canary") == Some(&10)).then_some(())
    })
    .await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_built_in_strategy_checks_its_settings() {
    let h = common::start().await;
    let register = |settings: Value| {
        json!({"name": "sticky", "upstream": "127.0.0.1:9", "strategy": "consistent-hash",
               "strategy_settings": settings, "ttl_secs": 60})
    };
    for (settings, needle) in [
        (
            json!({"table_size": "big"}),
            "`table_size` must be a whole number, got a string (\"big\")",
        ),
        (json!({"table_size": 5000}), "`table_size` must be a prime"),
        (
            json!({"size": 5003}),
            "consistent-hash has no setting `size`; it accepts `table_size`",
        ),
    ] {
        let (status, body) = h.post("/api/v1/services", register(settings)).await;
        assert_eq!(status, 400, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{needle} in {body}");
    }
    h.register(register(json!({"table_size": 5003}))).await;
    let service = h.service("sticky").await.expect("sticky");
    assert_eq!(service["strategy_settings"], json!({"table_size": 5003}));
    h.shutdown().await;
}

#[tokio::test]
async fn a_route_files_settings_are_checked_and_followed_live() {
    let h = with_canary().await;
    let stable = common::proxies::Upstream::start("stable").await;
    let canary = common::proxies::Upstream::start("canary").await;
    let route = |percent: &str| {
        format!(
            "host = \"files.localhost\"\nstrategy = \"example-canary\"\nupstreams = [\n  {{ addr = \"{}\", labels = {{ track = \"stable\" }} }},\n  {{ addr = \"{}\", labels = {{ track = \"canary\" }} }},\n]\n\n[strategy_settings]\ncanary_percent = {percent}\n",
            stable.addr, canary.addr
        )
    };
    h.write_route("files.route", &route("100"));
    all_reach(&h, "files.localhost", "canary").await;

    // Refused: a route error at the table, in the strategy's words; the last good version
    // keeps routing.
    h.write_route("files.route", &route("\"most\""));
    let errors = eventually(Duration::from_secs(10), "the route error", || async {
        let (_, body) = h.get("/api/v1/route-errors").await;
        body["errors"]
            .as_array()
            .filter(|errors| !errors.is_empty())
            .cloned()
    })
    .await;
    assert_eq!(errors[0]["field"], "strategy_settings", "{errors:?}");
    assert_eq!(errors[0]["line"], 8, "{errors:?}");
    let reason = errors[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("\"canary_percent\" must be a whole number from 0 to 100, got \"most\""),
        "{reason}"
    );
    all_reach(&h, "files.localhost", "canary").await;

    h.write_route("files.route", &route("0"));
    all_reach(&h, "files.localhost", "stable").await;
    let (_, body) = h.get("/api/v1/route-errors").await;
    assert_eq!(body["errors"], json!([]));
    h.shutdown().await;
}

/// A plugin's own settings, from its sidecar file or its upload, are what its routes start
/// from: a route's settings lay over them, and settings the plugin refuses keep it out.
#[tokio::test]
async fn plugin_wide_settings_come_from_the_sidecar_or_the_upload_and_routes_lay_theirs_over() {
    let plugins = tempfile::tempdir().expect("a plugin directory");
    let configured = plugins.path().to_owned();
    let h = common::start_with(move |c| {
        c.plugins_dir = Some(configured.clone());
        c.rescan_interval = Some(Duration::from_millis(200));
    })
    .await;
    let mut events = h.events(None).await;
    let dir = plugins.path();
    common::write_atomically(
        &dir.join("example-canary.toml"),
        "[settings]\ncanary_percent = 100\n",
    );
    common::write_bytes_atomically(
        &dir.join("example-canary.wasm"),
        &component("strategy-example-canary", &[]),
    );
    events.next_of("plugin_loaded").await;
    let (_, list) = h.get("/api/v1/plugins").await;
    let listed = list["plugins"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == "example-canary"))
        .cloned()
        .expect("listed");
    assert_eq!(
        listed["settings"],
        json!({"canary_percent": 100}),
        "{listed}"
    );

    let stable = common::proxies::Upstream::start("stable").await;
    let canary = common::proxies::Upstream::start("canary").await;
    for (service, settings) in [("wide", json!({})), ("own", json!({"canary_percent": 0}))] {
        for (upstream, track) in [(&stable, "stable"), (&canary, "canary")] {
            h.register(
                json!({"name": service, "upstream": upstream.addr.to_string(),
                              "strategy": "example-canary", "strategy_settings": settings,
                              "ttl_secs": 60, "meta": {"track": track}}),
            )
            .await;
        }
    }
    all_reach(&h, "wide.localhost", "canary").await;
    all_reach(&h, "own.localhost", "stable").await;

    // Settings the plugin refuses keep a new version out, in its words.
    let (status, body) =
        upload_canary(&h, "wait=true&settings=%7B%22canary_percent%22%3A200%7D").await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(r#"refuses its settings {"canary_percent":200}"#)
            && error.contains("must be a whole number from 0 to 100, got 200"),
        "{body}"
    );
    let (status, body) = upload_canary(&h, "settings=%5B1%5D").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "settings", "{body}");
    all_reach(&h, "wide.localhost", "canary").await;
    h.shutdown().await;
}
