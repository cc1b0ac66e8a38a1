//! Every kind of bad request gets its status and a JSON error naming the problem, and the
//! registry is left exactly as it was.

use crate::common;

use common::start;
use serde_json::{Value, json};

async fn raw(
    h: &common::TestHarbor,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut req = h
        .client
        .request(method.parse().expect("an HTTP method"), h.url(path))
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.expect("the API answers");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("a body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{status}: body is not JSON: {text:?}"));
    (status, body)
}

#[tokio::test]
async fn each_bad_request_gets_its_status_and_field() {
    let h = start().await;
    h.write_route("static-svc.route", "upstreams = [\"127.0.0.1:3000\"]\n");
    common::eventually(
        std::time::Duration::from_secs(1),
        "route loaded",
        || async { h.service("static-svc").await },
    )
    .await;
    h.register(json!({"name": "taken", "upstream": "127.0.0.1:9000", "host": "taken.test"}))
        .await;
    h.register(json!({"name": "db", "upstream": "127.0.0.1:5432", "protocol": "tcp", "listen": "127.0.0.1:15432"})).await;
    let (_, before) = h.get("/api/v1/services").await;

    let ok = json!({"name": "new", "upstream": "127.0.0.1:9001"});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        (
            "invalid name",
            with("name", json!("Not Valid")),
            400,
            Some("name"),
        ),
        (
            "name too long",
            with("name", json!("x".repeat(64))),
            400,
            Some("name"),
        ),
        (
            "missing name",
            json!({"upstream": "127.0.0.1:9001"}),
            400,
            Some("name"),
        ),
        (
            "missing upstream",
            json!({"name": "new"}),
            400,
            Some("upstream"),
        ),
        (
            "upstream without port",
            with("upstream", json!("127.0.0.1")),
            400,
            Some("upstream"),
        ),
        (
            "upstream port 0",
            with("upstream", json!("127.0.0.1:0")),
            400,
            Some("upstream"),
        ),
        (
            "upstream not a string",
            with("upstream", json!(9001)),
            400,
            Some("upstream"),
        ),
        (
            "bad host",
            with("host", json!("not a host")),
            400,
            Some("host"),
        ),
        (
            "bad hosts entry",
            with("hosts", json!(["ok.test", "-bad"])),
            400,
            Some("hosts"),
        ),
        (
            "host and hosts",
            with("hosts", json!(["a.test"]))
                .as_object()
                .map(|o| {
                    let mut o = o.clone();
                    o.insert("host".into(), json!("b.test"));
                    Value::Object(o)
                })
                .unwrap(),
            400,
            Some("hosts"),
        ),
        (
            "bad path",
            with("path", json!("no-slash")),
            400,
            Some("path"),
        ),
        (
            "bad protocol",
            with("protocol", json!("udp")),
            400,
            Some("protocol"),
        ),
        (
            "tcp without listen",
            with("protocol", json!("tcp")),
            400,
            Some("listen"),
        ),
        (
            "listen on http",
            with("listen", json!("127.0.0.1:1234")),
            400,
            Some("listen"),
        ),
        (
            "ttl zero",
            with("ttl_secs", json!(0)),
            400,
            Some("ttl_secs"),
        ),
        (
            "ttl too long",
            with("ttl_secs", json!(90_000)),
            400,
            Some("ttl_secs"),
        ),
        (
            "ttl negative",
            with("ttl_secs", json!(-5)),
            400,
            Some("ttl_secs"),
        ),
        ("weight zero", with("weight", json!(0)), 400, Some("weight")),
        (
            "bad strategy name",
            with("strategy", json!("Round Robin!")),
            400,
            Some("strategy"),
        ),
        (
            "unknown field",
            with("colour", json!("red")),
            400,
            Some("colour"),
        ),
        (
            "meta not strings",
            with("meta", json!({"a": 1})),
            400,
            Some("meta.a"),
        ),
        (
            "host taken",
            with("host", json!("taken.test")),
            409,
            Some("host"),
        ),
        (
            "listen taken",
            json!({"name": "db2", "upstream": "127.0.0.1:5433", "protocol": "tcp", "listen": "127.0.0.1:15432"}),
            409,
            Some("listen"),
        ),
        (
            "static name",
            with("name", json!("static-svc")),
            409,
            Some("name"),
        ),
        (
            "instance routing differs",
            json!({"name": "taken", "upstream": "127.0.0.1:9009", "host": "other.test"}),
            409,
            Some("hosts"),
        ),
    ];
    for (what, body, status, field) in cases {
        let (got, err) = raw(
            &h,
            "POST",
            "/api/v1/services",
            Some("application/json"),
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
        assert_eq!(got, status, "{what}: {err}");
        assert!(
            err["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {err}"
        );
        assert_eq!(err["field"].as_str(), field, "{what}: {err}");
    }

    let (s, e) = raw(
        &h,
        "POST",
        "/api/v1/services",
        Some("application/json"),
        b"{\"name\": ".to_vec(),
    )
    .await;
    assert_eq!(s, 400, "truncated JSON: {e}");
    let (s, e) = raw(
        &h,
        "POST",
        "/api/v1/services",
        Some("application/json"),
        b"[1,2,3]".to_vec(),
    )
    .await;
    assert_eq!(s, 400, "array body: {e}");
    let (s, e) = raw(
        &h,
        "POST",
        "/api/v1/services",
        Some("text/plain"),
        serde_json::to_vec(&ok).unwrap(),
    )
    .await;
    assert_eq!(s, 415, "text/plain: {e}");
    let (s, e) = raw(
        &h,
        "POST",
        "/api/v1/services",
        None,
        serde_json::to_vec(&ok).unwrap(),
    )
    .await;
    assert_eq!(s, 415, "no content type: {e}");
    let huge =
        json!({"name": "new", "upstream": "127.0.0.1:9001", "meta": {"pad": "x".repeat(100_000)}});
    let (s, e) = raw(
        &h,
        "POST",
        "/api/v1/services",
        Some("application/json"),
        serde_json::to_vec(&huge).unwrap(),
    )
    .await;
    assert_eq!(s, 413, "oversized body: {e}");
    assert!(
        e.to_string().contains("65536 bytes (--max-body)"),
        "the limit named: {e}"
    );
    let (s, e) = raw(
        &h,
        "POST",
        "/api/v1/services",
        Some("application/json"),
        br#"{"name": "new", "upstream": "127.0.0.1:9001"}xyz"#.to_vec(),
    )
    .await;
    assert_eq!(s, 400, "trailing data after the JSON value: {e}");
    assert!(
        e["error"].as_str().unwrap_or_default().contains("trailing"),
        "{e}"
    );
    let (s, e) = raw(
        &h,
        "POST",
        "/api/v1/services",
        Some("application/json"),
        serde_json::to_vec(&json!({"name": "new", "upstream": "999.1.1.1:80"})).unwrap(),
    )
    .await;
    assert_eq!((s, e["field"].as_str()), (400, Some("upstream")), "{e}");
    // Names in messages are shown as they were written.
    let (s, e) = raw(
        &h,
        "POST",
        "/api/v1/services",
        Some("application/json"),
        serde_json::to_vec(&json!({"name": "static-svc", "upstream": "127.0.0.1:9001"})).unwrap(),
    )
    .await;
    assert_eq!(s, 409, "{e}");
    let message = e["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("service \"static-svc\"") && !message.contains("ServiceName"),
        "{e}"
    );

    let unknown = "00000000-0000-4000-8000-000000000000";
    assert_eq!(
        raw(
            &h,
            "PUT",
            &format!("/api/v1/services/{unknown}/lease"),
            None,
            vec![]
        )
        .await
        .0,
        404
    );
    assert_eq!(
        raw(
            &h,
            "DELETE",
            &format!("/api/v1/services/{unknown}"),
            None,
            vec![]
        )
        .await
        .0,
        404
    );
    let (s, e) = raw(&h, "PUT", "/api/v1/services/not-an-id/lease", None, vec![]).await;
    assert_eq!((s, e["field"].as_str()), (400, Some("id")));
    assert_eq!(
        raw(&h, "GET", "/api/v1/services/nope", None, vec![])
            .await
            .0,
        404
    );
    assert_eq!(
        raw(&h, "GET", "/api/v1/services/BAD%20NAME", None, vec![])
            .await
            .0,
        400
    );
    assert_eq!(raw(&h, "GET", "/api/v1/nothing", None, vec![]).await.0, 404);
    assert_eq!(
        raw(&h, "PATCH", "/api/v1/services", None, vec![]).await.0,
        405
    );

    let (_, after) = h.get("/api/v1/services").await;
    assert_eq!(
        common::without_countdowns(before),
        common::without_countdowns(after),
        "a refused request changed the registry"
    );
    h.shutdown().await;
}

/// Arbitrary bytes and shapes never panic the daemon or change the registry.
#[tokio::test]
async fn garbage_never_hurts() {
    let h = start().await;
    h.register(json!({"name": "keep", "upstream": "127.0.0.1:9000"}))
        .await;
    let (_, before) = h.get("/api/v1/services").await;
    // A fixed-seed generator, so a failure reproduces.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let fragments: [&[u8]; 12] = [
        b"{",
        b"}",
        b"\"name\"",
        b":",
        b"\"upstream\"",
        b"\"127.0.0.1:1\"",
        b",",
        b"[",
        b"null",
        b"\xff\xfe",
        b"1e999",
        b"\"\\u0000\"",
    ];
    for _ in 0..300 {
        let len = (next() % 24) as usize;
        let body: Vec<u8> = (0..len)
            .flat_map(|_| fragments[(next() % 12) as usize].to_vec())
            .collect();
        let path = match next() % 3 {
            0 => "/api/v1/services".to_owned(),
            1 => format!("/api/v1/services/{}/lease", next()),
            _ => "/api/v1/services/%00%ff/lease".to_owned(),
        };
        let method = if path.ends_with("lease") {
            "PUT"
        } else {
            "POST"
        };
        let resp = h
            .client
            .request(method.parse().unwrap(), h.url(&path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        assert!(
            (400..500).contains(&status),
            "{status} for {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    let (status, _) = h.get("/healthz").await;
    assert_eq!(status, 200);
    let (_, after) = h.get("/api/v1/services").await;
    assert_eq!(
        common::without_countdowns(before),
        common::without_countdowns(after)
    );
    h.shutdown().await;
}

/// A dry run checks a registration exactly as a real one is checked, shows the service as it
/// would be, and registers nothing; a query it does not know is an error, not a registration.
#[tokio::test]
async fn a_dry_run_registration_is_checked_and_changes_nothing() {
    let h = start().await;
    h.register(json!({"name": "web", "upstream": "127.0.0.1:9001", "ttl_secs": 60, "host": "web.localhost"}))
        .await;
    // The services, but for the time their leases have left.
    let services = || async {
        let (_, mut body) = h.get("/api/v1/services").await;
        for s in body["services"].as_array_mut().into_iter().flatten() {
            for i in s["instances"].as_array_mut().into_iter().flatten() {
                i["lease"]["remaining_ms"] = Value::Null;
            }
        }
        body
    };
    let before = services().await;
    let post = |path: &'static str, body: Value| {
        let body = serde_json::to_vec(&body).expect("JSON");
        let h = &h;
        async move { raw(h, "POST", path, Some("application/json"), body).await }
    };

    let (status, dry) = post(
        "/api/v1/services?dry_run=true",
        json!({"name": "web", "upstream": "127.0.0.1:9002", "ttl_secs": 60, "host": "web.localhost"}),
    )
    .await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        dry["service"]["instances"].as_array().map(Vec::len),
        Some(2),
        "{dry}"
    );
    assert_eq!(
        dry["backend"],
        Value::Null,
        "the embedded proxy is written nothing"
    );

    // The same conflict a real registration meets.
    let (status, err) = post(
        "/api/v1/services?dry_run=true",
        json!({"name": "other", "upstream": "127.0.0.1:9003", "ttl_secs": 60, "host": "web.localhost"}),
    )
    .await;
    assert_eq!(status, 409, "{err}");
    let (status, err) = post(
        "/api/v1/services?dry_run=yes",
        json!({"name": "api", "upstream": "127.0.0.1:9003", "ttl_secs": 60, "host": "api.localhost"}),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"].as_str().unwrap_or_default().contains("query"),
        "{err}"
    );
    assert_eq!(services().await, before, "nothing changed");
    h.shutdown().await;
}
