//! Access control (bearer tokens with service-name prefixes) and the unix-socket listener.

mod common;

use common::start_with;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN: &str = "admin-token-0123456789abcdef";
const PREVIEW: &str = "preview-token-0123456789abcdef";

fn token_file() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("harbor-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the token file");
    let file = dir.join("tokens");
    std::fs::write(
        &file,
        format!("# full access\n{ADMIN}\n{PREVIEW} preview-\n"),
    )
    .expect("the token file");
    file
}

#[tokio::test]
async fn mutating_calls_need_a_token_and_stay_within_its_prefix() {
    let h = start_with(|c| c.token_file = Some(token_file())).await;
    let body = json!({"name": "preview-42", "upstream": "127.0.0.1:9001"});
    let post = |token: Option<&'static str>, body: serde_json::Value| {
        let mut req = h.client.post(h.url("/api/v1/services")).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };

    let resp = post(None, body.clone()).await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let err: serde_json::Value = resp.json().await.unwrap();
    assert!(err["error"].as_str().unwrap().contains("Bearer"));
    assert_eq!(
        post(Some("wrong-token-0123456789abcdef"), body.clone())
            .await
            .unwrap()
            .status(),
        401
    );

    let resp = post(
        Some(PREVIEW),
        json!({"name": "prod-db", "upstream": "127.0.0.1:9002"}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 403);
    let admin_grant: serde_json::Value = post(
        Some(ADMIN),
        json!({"name": "prod-db", "upstream": "127.0.0.1:9002"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let preview = post(Some(PREVIEW), body.clone()).await.unwrap();
    assert_eq!(preview.status(), 201);

    // The preview token cannot renew or remove the admin's instance, even knowing its id.
    let admin_id = admin_grant["id"].as_str().unwrap();
    let renew = h
        .client
        .put(h.url(&format!("/api/v1/services/{admin_id}/lease")))
        .bearer_auth(PREVIEW)
        .send()
        .await
        .unwrap();
    assert_eq!(renew.status(), 403);
    let delete = h
        .client
        .delete(h.url(&format!("/api/v1/services/{admin_id}")))
        .bearer_auth(PREVIEW)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 403);
    let delete = h
        .client
        .delete(h.url(&format!("/api/v1/services/{admin_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 401);
    let delete = h
        .client
        .delete(h.url(&format!("/api/v1/services/{admin_id}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 204);

    // Plugins affect every service: a prefix-limited token may not upload one.
    let upload = h
        .client
        .put(h.url("/api/v1/plugins/anything"))
        .bearer_auth(PREVIEW)
        .header("content-type", "application/wasm")
        .body(b"\0asm".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 403);

    // Reads stay open.
    for path in [
        "/api/v1/catalog",
        "/healthz",
        "/api/v1/services",
        "/api/v1/plugins",
    ] {
        assert_eq!(h.get(path).await.0, 200, "{path}");
    }
    let events = h.client.get(h.url("/api/v1/events")).send().await.unwrap();
    assert_eq!(events.status(), 200);
    h.shutdown().await;
}

#[tokio::test]
async fn the_api_answers_on_a_unix_socket() {
    let h = start_with(|c| {
        let sock = std::env::temp_dir().join(format!("harbor-api-{}.sock", std::process::id()));
        c.api.push(harbor::config::ListenAddr::Unix(sock));
    })
    .await;
    let sock = std::env::temp_dir().join(format!("harbor-api-{}.sock", std::process::id()));
    let mut stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let body = r#"{"name":"via-socket","upstream":"127.0.0.1:9001"}"#;
    let request = format!(
        "POST /api/v1/services HTTP/1.1\r\nHost: harbor\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    assert!(h.service("via-socket").await.is_some());
    h.shutdown().await;
    assert!(!sock.exists(), "socket file left behind");
}
