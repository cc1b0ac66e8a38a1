//! Ephemeral registration through the API: leases granted, renewed, expired on time, deregistered;
//! the read views; persistence across a restart.

use crate::common;

use std::time::{Duration, SystemTime};

use common::{eventually, parse_time, start};
use serde_json::json;

#[tokio::test]
async fn register_renew_deregister() {
    let h = start().await;
    let grant = h
        .register(json!({
            "name": "api", "upstream": "127.0.0.1:9001", "ttl_secs": 30,
            "host": "api.example.test", "path": "/v1", "public": true,
            "strategy": "least-connections", "meta": {"version": "1.2"}
        }))
        .await;
    let id = grant["id"].as_str().unwrap().to_owned();
    assert_eq!(grant["name"], "api");
    assert_eq!(grant["lease"]["ttl_secs"], 30);
    let expires = parse_time(&grant["lease"]["expires_at"]);
    let left = expires.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(28) && left <= Duration::from_secs(30),
        "{left:?}"
    );

    let svc = h.service("api").await.unwrap();
    assert_eq!(svc["kind"], "ephemeral");
    assert_eq!(svc["hosts"][0], "api.example.test");
    assert_eq!(svc["path"], "/v1");
    assert_eq!(svc["strategy"], "least-connections");
    assert_eq!(svc["instances"][0]["id"], id.as_str());
    assert_eq!(svc["instances"][0]["meta"]["version"], "1.2");
    assert!(
        svc["instances"][0]["lease"]["remaining_ms"]
            .as_u64()
            .unwrap()
            > 28_000
    );

    // The same name and upstream again: same id, lease refreshed, 200 rather than 201.
    let (status, again) = h
        .post(
            "/api/v1/services",
            json!({
                "name": "api", "upstream": "127.0.0.1:9001", "ttl_secs": 60,
                "host": "api.example.test", "path": "/v1", "public": true,
                "strategy": "least-connections", "meta": {"version": "1.2"}
            }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["lease"]["ttl_secs"], 60);

    // A second upstream joins the same service.
    h.register(json!({
        "name": "api", "upstream": "127.0.0.1:9002", "host": "api.example.test",
        "path": "/v1", "public": true, "strategy": "least-connections"
    }))
    .await;
    let svc = h.service("api").await.unwrap();
    assert_eq!(svc["upstreams"].as_array().unwrap().len(), 2);

    let (status, renewed) = h.put(&format!("/api/v1/services/{id}/lease")).await;
    assert_eq!(status, 200);
    assert_eq!(renewed["id"], id.as_str());
    assert!(
        parse_time(&renewed["lease"]["expires_at"]) >= parse_time(&again["lease"]["expires_at"])
    );

    assert_eq!(h.delete(&format!("/api/v1/services/{id}")).await, 204);
    assert_eq!(h.delete(&format!("/api/v1/services/{id}")).await, 404);
    assert_eq!(h.put(&format!("/api/v1/services/{id}/lease")).await.0, 404);
    let svc = h.service("api").await.unwrap();
    assert_eq!(svc["upstreams"].as_array().unwrap().len(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn an_expired_lease_is_removed_within_250ms_of_its_deadline() {
    let h = start().await;
    let mut events = h.events(None).await;
    assert_eq!(events.next().await.event, "snapshot");
    let grant = h
        .register(json!({"name": "brief", "upstream": "127.0.0.1:9001", "ttl_secs": 1}))
        .await;
    let deadline = parse_time(&grant["lease"]["expires_at"]);
    let expired = events.next_of("instance_expired").await;
    let seen = SystemTime::now();
    assert_eq!(expired.data["id"], grant["id"]);
    // expires_at is rounded to the millisecond, so allow that much on the early side.
    let late = seen
        .duration_since(deadline)
        .unwrap_or_else(|e| panic!("removed {:?} before its deadline", e.duration()));
    assert!(
        late <= Duration::from_millis(250),
        "removed {late:?} after the deadline"
    );
    events.next_of("service_removed").await;
    assert!(h.service("brief").await.is_none());
    h.shutdown().await;
}

#[tokio::test]
async fn renewals_keep_an_instance_alive() {
    let h = start().await;
    let grant = h
        .register(json!({"name": "kept", "upstream": "127.0.0.1:9001", "ttl_secs": 1}))
        .await;
    let id = grant["id"].as_str().unwrap();
    let until = std::time::Instant::now() + Duration::from_millis(2_500);
    while std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, _) = h.put(&format!("/api/v1/services/{id}/lease")).await;
        assert_eq!(
            status, 200,
            "renewal refused: the lease lapsed while renewed"
        );
    }
    assert!(h.service("kept").await.is_some());
    // Stop renewing: gone shortly after the last lease runs out.
    eventually(
        Duration::from_millis(1_500),
        "unrenewed instance removed",
        || async { h.service("kept").await.is_none().then_some(()) },
    )
    .await;
    h.shutdown().await;
}

#[tokio::test]
async fn renewal_may_change_the_ttl() {
    let h = start().await;
    let grant = h
        .register(json!({"name": "svc", "upstream": "127.0.0.1:9001", "ttl_secs": 5}))
        .await;
    let id = grant["id"].as_str().unwrap();
    let resp = h
        .client
        .put(h.url(&format!("/api/v1/services/{id}/lease")))
        .json(&json!({"ttl_secs": 120}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["lease"]["ttl_secs"], 120);
    h.shutdown().await;
}

#[tokio::test]
async fn catalog_shows_public_services_without_internals() {
    let h = start().await;
    h.write_route(
        "docs.route",
        "upstreams = [\"127.0.0.1:3000\"]\npublic = true\nmeta = { owner = \"ops\" }\n",
    );
    h.write_route("admin.route", "upstreams = [\"127.0.0.1:3001\"]\n");
    eventually(Duration::from_secs(1), "routes loaded", || async {
        h.service("admin").await.and(h.service("docs").await)
    })
    .await;
    h.register(json!({"name": "web", "upstream": "127.0.0.1:9001", "public": true}))
        .await;
    h.register(json!({"name": "secret", "upstream": "127.0.0.1:9002"}))
        .await;

    let (status, catalog) = h.get("/api/v1/catalog").await;
    assert_eq!(status, 200);
    let names: Vec<_> = catalog["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["docs", "web"]);
    let text = catalog.to_string();
    for internal in ["\"id\"", "meta", "source", "ops", "secret", "admin"] {
        assert!(!text.contains(internal), "catalog leaks {internal}: {text}");
    }
    let web = &catalog["services"][1];
    assert_eq!(web["hosts"][0], "web.localhost");
    assert!(web["upstreams"][0]["expires_at"].is_string());

    let (_, all) = h.get("/api/v1/services").await;
    assert_eq!(all["services"].as_array().unwrap().len(), 4);
    h.shutdown().await;
}

#[tokio::test]
async fn registrations_survive_a_restart_and_expired_ones_do_not() {
    let h = start().await;
    let kept = h
        .register(
            json!({"name": "kept", "upstream": "127.0.0.1:9001", "ttl_secs": 300, "public": true}),
        )
        .await;
    let brief = h
        .register(json!({"name": "brief", "upstream": "127.0.0.1:9002", "ttl_secs": 1}))
        .await;
    let brief_deadline = parse_time(&brief["lease"]["expires_at"]);
    let h = h.restart().await;

    let svc = h.service("kept").await.expect("kept survives the restart");
    let inst = &svc["instances"][0];
    assert_eq!(inst["id"], kept["id"]);
    assert_eq!(
        inst["lease"]["expires_at"], kept["lease"]["expires_at"],
        "deadline moved"
    );
    assert_eq!(svc["public"], true);
    // The restored id is live: it renews.
    let (status, _) = h
        .put(&format!(
            "/api/v1/services/{}/lease",
            kept["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 200);

    // Stop, let brief's lease run out while Harbor is down, start again.
    let mut h = h;
    if let Some(running) = h.harbor.take() {
        running.shutdown().await;
    }
    let wait = brief_deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(10)).await;
    let h = h.restart().await;
    assert!(
        h.service("brief").await.is_none(),
        "expired while down, yet restored"
    );
    assert!(h.service("kept").await.is_some());
    h.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_state_file_is_set_aside_not_a_crash() {
    let h = start().await;
    h.register(json!({"name": "a", "upstream": "127.0.0.1:9001"}))
        .await;
    let mut h = h;
    if let Some(running) = h.harbor.take() {
        running.shutdown().await;
    }
    let state_file = h.state.path().join("ephemeral.json");
    std::fs::write(&state_file, b"{\"version\": 1, \"instances\": [tru").unwrap();
    let h = h.restart().await;
    assert!(h.service("a").await.is_none());
    let aside: Vec<_> = std::fs::read_dir(h.state.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .collect();
    assert_eq!(aside.len(), 1, "corrupt file kept for inspection");
    // Reported where a client that arrives after the start can see it.
    let (_, status) = h.get("/api/v1/status").await;
    let reason = status["state"]["set_aside"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("not a valid state file"), "{status}");
    let snapshot = h.events(None).await.next_of("snapshot").await;
    assert!(
        snapshot.data["state"]["set_aside"]["moved_to"].is_string(),
        "{:?}",
        snapshot.data
    );
    // And the daemon works: new registrations are saved again.
    h.register(json!({"name": "b", "upstream": "127.0.0.1:9001"}))
        .await;
    let h = h.restart().await;
    assert!(h.service("b").await.is_some());
    h.shutdown().await;
}
