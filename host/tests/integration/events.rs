//! The event stream: a snapshot first, every change after it in order, resumption with
//! `Last-Event-ID`, a fresh snapshot for a client too far behind, keep-alive comments.

use crate::common;

use std::time::Duration;

use common::{start, start_with};
use serde_json::json;

#[tokio::test]
async fn a_new_stream_starts_with_a_snapshot_then_delivers_each_change() {
    let h = start().await;
    h.write_route(
        "docs.route",
        "upstreams = [\"127.0.0.1:3000\"]\npublic = true\n",
    );
    common::eventually(Duration::from_secs(1), "route loaded", || async {
        h.service("docs").await
    })
    .await;

    let mut events = h.events(None).await;
    let snapshot = events.next().await;
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.data["services"][0]["name"], "docs");
    let snapshot_id: u64 = snapshot.id.unwrap().parse().unwrap();

    let grant = h
        .register(json!({"name": "api", "upstream": "127.0.0.1:9001"}))
        .await;
    let id = grant["id"].as_str().unwrap();
    h.put(&format!("/api/v1/services/{id}/lease")).await;
    h.delete(&format!("/api/v1/services/{id}")).await;
    let mut last = snapshot_id;
    let mut expect = async |kinds: &[&str]| {
        for kind in kinds {
            let e = events.next().await;
            assert_eq!(e.event, *kind, "{:?}", e.data);
            assert_eq!(e.data["type"], *kind);
            let eid: u64 = e.id.unwrap().parse().unwrap();
            assert!(eid > last, "ids must increase");
            last = eid;
        }
    };
    expect(&[
        "service_added",
        "instance_registered",
        "instance_renewed",
        "instance_deregistered",
        "service_removed",
    ])
    .await;
    h.write_route(
        "docs.route",
        "upstreams = [\"127.0.0.1:3001\"]\npublic = true\n",
    );
    expect(&["service_updated"]).await;
    std::fs::remove_file(h.routes.path().join("docs.route")).unwrap();
    expect(&["service_removed"]).await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_client_resuming_with_last_event_id_gets_exactly_what_it_missed() {
    let h = start().await;
    let mut events = h.events(None).await;
    let snapshot = events.next().await;
    h.register(json!({"name": "one", "upstream": "127.0.0.1:9001"}))
        .await;
    let seen = events.next_of("instance_registered").await;
    drop(events);

    // While disconnected:
    h.register(json!({"name": "two", "upstream": "127.0.0.1:9002"}))
        .await;
    h.register(json!({"name": "one", "upstream": "127.0.0.1:9003"}))
        .await;

    let mut resumed = h.events(seen.id.as_deref()).await;
    let kinds: Vec<_> = [
        resumed.next().await,
        resumed.next().await,
        resumed.next().await,
    ]
    .into_iter()
    .map(|e| {
        (
            e.event,
            e.data["name"]
                .as_str()
                .or(e.data["service"]["name"].as_str())
                .map(str::to_owned),
        )
    })
    .collect();
    assert_eq!(
        kinds,
        [
            ("service_added".to_owned(), Some("two".to_owned())),
            ("instance_registered".to_owned(), Some("two".to_owned())),
            ("instance_registered".to_owned(), Some("one".to_owned())),
        ]
    );
    // Nothing duplicated, nothing more.
    assert!(
        resumed
            .next_within(Duration::from_millis(200))
            .await
            .is_none()
    );

    // Resuming from the snapshot's own id replays everything after it.
    let mut from_start = h.events(snapshot.id.as_deref()).await;
    assert_eq!(from_start.next().await.event, "service_added");
    h.shutdown().await;
}

#[tokio::test]
async fn a_client_too_far_behind_gets_a_fresh_snapshot() {
    let h = start_with(|c| c.event_ring = 4).await;
    let mut events = h.events(None).await;
    let old = events.next().await.id;
    drop(events);
    for port in 9001..9006 {
        h.register(json!({"name": format!("svc-{port}"), "upstream": format!("127.0.0.1:{port}")}))
            .await;
    }
    let mut resumed = h.events(old.as_deref()).await;
    let first = resumed.next().await;
    assert_eq!(first.event, "snapshot");
    assert_eq!(first.data["services"].as_array().unwrap().len(), 5);

    // An id from an earlier run of the daemon is also treated as behind.
    let mut stranger = h.events(Some("12345")).await;
    assert_eq!(stranger.next().await.event, "snapshot");
    h.shutdown().await;
}

#[tokio::test]
async fn idle_streams_get_keep_alive_comments() {
    let h = start_with(|c| c.sse_keep_alive = Duration::from_millis(100)).await;
    let mut events = h.events(None).await;
    events.next().await;
    assert!(
        events
            .next_within(Duration::from_millis(450))
            .await
            .is_none()
    );
    assert!(
        events.comments >= 2,
        "saw {} keep-alive comments",
        events.comments
    );
    h.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let h = start().await;
    let mut events = h.events(None).await;
    events.next().await;
    tokio::time::timeout(Duration::from_secs(5), h.shutdown())
        .await
        .expect("shutdown does not wait on open event streams");
    assert!(events.next_within(Duration::from_secs(1)).await.is_none());
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let h = start().await;
    let grant = h
        .register(json!({"name": "api", "upstream": "127.0.0.1:9001", "ttl_secs": 1}))
        .await;
    h.register(json!({"name": "api", "upstream": "127.0.0.1:9002"}))
        .await;
    h.put(&format!(
        "/api/v1/services/{}/lease",
        grant["id"].as_str().unwrap()
    ))
    .await;
    h.post("/api/v1/services", json!({"name": "BAD"})).await;
    common::eventually(Duration::from_secs(3), "lease expiry", || async {
        (h.service("api").await?["instances"].as_array()?.len() == 1).then_some(())
    })
    .await;
    let resp = h.client.get(h.url("/metrics")).send().await.unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    for line in [
        "harbor_leases_granted_total 2",
        "harbor_leases_renewed_total 1",
        "harbor_leases_expired_total 1",
        "harbor_instances 1",
        "harbor_services{kind=\"ephemeral\"} 1",
        "harbor_services{kind=\"static\"} 0",
        "harbor_api_requests_total{method=\"POST\",status=\"201\"} 2",
        "harbor_api_requests_total{method=\"POST\",status=\"400\"} 1",
        "harbor_lease_expiry_lateness_seconds_count 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    h.shutdown().await;
}
