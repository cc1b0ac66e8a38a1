//! `.route` files followed live: create, edit, rename and delete apply within a second without a
//! restart; a bad file keeps the last good version and is reported with file and line.

use crate::common;

use std::time::Duration;

use common::{eventually, start, start_with};
use serde_json::Value;

const APPLY_WITHIN: Duration = Duration::from_secs(1);

async fn upstream_of(h: &common::TestHarbor, name: &str) -> Option<String> {
    let svc = h.service(name).await?;
    svc["upstreams"][0]["addr"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn create_edit_rename_delete_apply_without_restart() {
    let h = start().await;
    assert!(h.service("grafana").await.is_none());

    h.write_route(
        "grafana.route",
        "host = \"grafana.localhost\"\nupstreams = [\"127.0.0.1:3000\"]\npublic = true\n",
    );
    eventually(APPLY_WITHIN, "created file applied", || async {
        upstream_of(&h, "grafana")
            .await
            .filter(|u| u == "127.0.0.1:3000")
    })
    .await;
    let svc = h.service("grafana").await.unwrap();
    assert_eq!(svc["kind"], "static");
    assert_eq!(svc["hosts"][0], "grafana.localhost");
    assert_eq!(svc["path"], "/");
    assert_eq!(svc["strategy"], "round-robin");

    h.write_route(
        "grafana.route",
        "host = \"grafana.localhost\"\nupstreams = [\"127.0.0.1:3001\"]\npublic = true\n",
    );
    eventually(APPLY_WITHIN, "edited file applied", || async {
        upstream_of(&h, "grafana")
            .await
            .filter(|u| u == "127.0.0.1:3001")
    })
    .await;

    std::fs::rename(
        h.routes.path().join("grafana.route"),
        h.routes.path().join("dash.route"),
    )
    .unwrap();
    eventually(APPLY_WITHIN, "rename applied", || async {
        let old = h.service("grafana").await;
        let new = h.service("dash").await;
        (old.is_none() && new.is_some()).then_some(())
    })
    .await;

    std::fs::remove_file(h.routes.path().join("dash.route")).unwrap();
    eventually(APPLY_WITHIN, "delete applied", || async {
        h.service("dash").await.is_none().then_some(())
    })
    .await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_malformed_edit_keeps_the_last_good_version_and_names_file_and_line() {
    let h = start().await;
    h.write_route("api.route", "upstreams = [\"127.0.0.1:4000\"]\n");
    eventually(APPLY_WITHIN, "file applied", || async {
        h.service("api").await
    })
    .await;
    let mut events = h.events(None).await;
    assert_eq!(events.next().await.event, "snapshot");

    h.write_route(
        "api.route",
        "upstreams = [\"127.0.0.1:4001\"]\nhost = \"bad host\"\n",
    );
    let err = events.next_of("route_file_error").await.data;
    assert!(
        err["file"].as_str().unwrap().ends_with("api.route"),
        "{err}"
    );
    assert_eq!(err["line"], 2);
    assert_eq!(err["field"], "host");

    // Still the old upstream, and the API lists the error.
    assert_eq!(
        upstream_of(&h, "api").await.as_deref(),
        Some("127.0.0.1:4000")
    );
    let (_, listed) = h.get("/api/v1/route-errors").await;
    let errors = listed["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["line"], 2);
    assert!(errors[0]["reason"].as_str().unwrap().contains("bad host"));

    // Broken TOML is reported the same way.
    h.write_route("api.route", "upstreams = [\"127.0.0.1:4001\"\n\n");
    let err = events.next_of("route_file_error").await.data;
    assert!(err["line"].as_u64().is_some(), "{err}");
    assert_eq!(
        upstream_of(&h, "api").await.as_deref(),
        Some("127.0.0.1:4000")
    );

    // Fixing the file clears the error and applies the new version.
    h.write_route("api.route", "upstreams = [\"127.0.0.1:4001\"]\n");
    events.next_of("route_file_recovered").await;
    assert_eq!(
        upstream_of(&h, "api").await.as_deref(),
        Some("127.0.0.1:4001")
    );
    let (_, listed) = h.get("/api/v1/route-errors").await;
    assert_eq!(listed["errors"], Value::Array(vec![]));

    let metrics = h.metrics().await;
    assert!(
        metrics.contains("harbor_route_file_errors_total 2"),
        "{metrics}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn invalid_files_of_every_kind_are_reported_and_other_files_load() {
    let h = start().await;
    h.write_route("ok.route", "upstreams = [\"127.0.0.1:4000\"]\n");
    h.write_route("Bad_Name.route", "upstreams = [\"127.0.0.1:4000\"]\n");
    h.write_route(
        "unknown.route",
        "upstreams = [\"127.0.0.1:4000\"]\ncolour = \"red\"\n",
    );
    h.write_route("noport.route", "upstreams = [\"127.0.0.1\"]\n");
    h.write_route("notes.txt", "this is not a route");
    h.write_route(".hidden.route", "garbage");
    let errors = eventually(APPLY_WITHIN, "three errors", || async {
        let (_, body) = h.get("/api/v1/route-errors").await;
        let errors = body["errors"].as_array().cloned().unwrap_or_default();
        (errors.len() == 3).then_some(errors)
    })
    .await;
    let reason_of = |file: &str| {
        errors
            .iter()
            .find(|e| e["file"].as_str().unwrap().ends_with(file))
            .unwrap_or_else(|| panic!("no error for {file}: {errors:?}"))
            .clone()
    };
    assert_eq!(reason_of("Bad_Name.route")["field"], "name");
    assert!(
        reason_of("unknown.route")["reason"]
            .as_str()
            .unwrap()
            .contains("colour")
    );
    assert_eq!(reason_of("unknown.route")["line"], 2);
    assert_eq!(reason_of("noport.route")["field"], "upstreams");
    assert!(h.service("ok").await.is_some());
    let (_, all) = h.get("/api/v1/services").await;
    assert_eq!(all["services"].as_array().unwrap().len(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn duplicate_listen_address_in_a_new_file_is_refused() {
    let h = start().await;
    let tcp =
        "protocol = \"tcp\"\nlisten = \"127.0.0.1:15432\"\nupstreams = [\"127.0.0.1:5432\"]\n";
    h.write_route("pg.route", tcp);
    eventually(APPLY_WITHIN, "pg applied", || async {
        h.service("pg").await
    })
    .await;
    h.write_route("pg2.route", tcp);
    let err = eventually(APPLY_WITHIN, "conflict reported", || async {
        let (_, body) = h.get("/api/v1/route-errors").await;
        body["errors"].as_array().and_then(|e| e.first().cloned())
    })
    .await;
    assert_eq!(err["field"], "listen");
    assert_eq!(err["line"], 2);
    assert!(err["reason"].as_str().unwrap().contains("\"pg\""), "{err}");
    assert!(h.service("pg2").await.is_none());
    h.shutdown().await;
}

#[tokio::test]
async fn with_watching_off_a_rescan_request_rereads_the_directory() {
    let h = start_with(|c| {
        c.watch = false;
        c.rescan_interval = None;
    })
    .await;
    h.write_route("late.route", "upstreams = [\"127.0.0.1:4000\"]\n");
    // Nothing follows the directory, so the file stays unseen until asked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(h.service("late").await.is_none());
    h.harbor().rescan();
    eventually(APPLY_WITHIN, "rescan applied", || async {
        h.service("late").await
    })
    .await;
    h.shutdown().await;
}

#[tokio::test]
async fn the_periodic_rescan_catches_what_the_watcher_misses() {
    let h = start_with(|c| {
        c.watch = false;
        c.rescan_interval = Some(Duration::from_millis(200));
    })
    .await;
    h.write_route("polled.route", "upstreams = [\"127.0.0.1:4000\"]\n");
    eventually(APPLY_WITHIN, "rescan applied", || async {
        h.service("polled").await
    })
    .await;
    h.shutdown().await;
}

async fn route_error_about(h: &common::TestHarbor, needle: &str) -> Option<()> {
    let (_, body) = h.get("/api/v1/route-errors").await;
    body.to_string().contains(needle).then_some(())
}

/// Deleted, the routes directory leaves its services in force and says so; created again, it is
/// followed again at once, without waiting for the periodic rescan.
#[tokio::test]
async fn a_deleted_and_recreated_routes_directory_is_followed_again() {
    let h = start().await;
    h.write_route("a.route", "upstreams = [\"127.0.0.1:3000\"]\n");
    eventually(APPLY_WITHIN, "a", || async { h.service("a").await }).await;

    std::fs::remove_dir_all(h.routes.path()).unwrap();
    eventually(
        Duration::from_secs(2),
        "the missing directory reported",
        || route_error_about(&h, "routes directory does not exist"),
    )
    .await;
    assert!(
        h.service("a").await.is_some(),
        "the last good services stay"
    );

    std::fs::create_dir(h.routes.path()).unwrap();
    h.write_route("b.route", "upstreams = [\"127.0.0.1:3001\"]\n");
    eventually(Duration::from_secs(2), "the new directory read", || async {
        let (a, b) = (h.service("a").await, h.service("b").await);
        (a.is_none() && b.is_some()).then_some(())
    })
    .await;
    let (_, errors) = h.get("/api/v1/route-errors").await;
    assert_eq!(errors["errors"], serde_json::json!([]), "{errors}");
    h.write_route("c.route", "upstreams = [\"127.0.0.1:3002\"]\n");
    eventually(APPLY_WITHIN, "a change in the new directory", || async {
        h.service("c").await
    })
    .await;
    h.shutdown().await;
}

/// `--routes` names a symlink; pointing it at another directory (as deployment tools do, by
/// renaming a new link over it) is followed at once.
#[tokio::test]
async fn a_swapped_symlink_target_is_followed() {
    let base = tempfile::tempdir().unwrap();
    let (v1, v2, link) = (
        base.path().join("v1"),
        base.path().join("v2"),
        base.path().join("current"),
    );
    std::fs::create_dir(&v1).unwrap();
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v1.join("old.route"), "upstreams = [\"127.0.0.1:3000\"]\n").unwrap();
    std::fs::write(v2.join("new.route"), "upstreams = [\"127.0.0.1:3001\"]\n").unwrap();
    std::os::unix::fs::symlink(&v1, &link).unwrap();
    let routes = link.clone();
    let h = start_with(move |c| c.routes_dir = routes.clone()).await;
    eventually(APPLY_WITHIN, "old", || async { h.service("old").await }).await;

    let next = base.path().join("current.next");
    std::os::unix::fs::symlink(&v2, &next).unwrap();
    std::fs::rename(&next, &link).unwrap();
    eventually(Duration::from_secs(2), "the new target read", || async {
        let (old, new) = (h.service("old").await, h.service("new").await);
        (old.is_none() && new.is_some()).then_some(())
    })
    .await;
    std::fs::write(v2.join("more.route"), "upstreams = [\"127.0.0.1:3002\"]\n").unwrap();
    eventually(APPLY_WITHIN, "a change in the new target", || async {
        h.service("more").await
    })
    .await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_route_file_whose_name_is_not_utf8_is_reported() {
    use std::os::unix::ffi::OsStrExt;
    let h = start().await;
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.route");
    std::fs::write(
        h.routes.path().join(name),
        "upstreams = [\"127.0.0.1:3000\"]\n",
    )
    .unwrap();
    eventually(APPLY_WITHIN, "the bad name reported", || {
        route_error_about(&h, "not valid UTF-8")
    })
    .await;
    h.shutdown().await;
}
