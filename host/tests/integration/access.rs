//! Access control (bearer tokens with service-name prefixes) and the unix-socket listener.

use crate::common;

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

const BARE: &str = "bare-token-0123456789abcdef";

/// A token file of its own, written with `lines`.
fn tokens(dir: &tempfile::TempDir, lines: &str) -> std::path::PathBuf {
    let file = dir.path().join("tokens");
    std::fs::write(&file, lines).expect("the token file");
    file
}

/// A scoped token reaches only the hosts and listen addresses its line grants: no wildcard, no
/// foreign host (not even one just freed), no listener outside its ranges.
#[tokio::test]
async fn a_scoped_token_claims_only_the_hosts_and_ports_it_was_given() {
    let dir = tempfile::tempdir().expect("dir");
    let port = common::proxies::free_port();
    let file = tokens(
        &dir,
        &format!(
            "{ADMIN}\n{PREVIEW} preview- hosts=*.preview.example.com,preview-*.localhost listen=127.0.0.1:{port}-{port}\n{BARE} bare-\n"
        ),
    );
    let h = start_with(move |c| c.token_file = Some(file.clone())).await;
    let register = |token: &'static str, body: serde_json::Value| {
        let h = &h;
        async move {
            let r = h
                .client
                .post(h.url("/api/v1/services"))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("the API answers");
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let up = "127.0.0.1:9001";

    // Wildcards need full access.
    let (status, err) = register(
        PREVIEW,
        json!({"name": "preview-w", "upstream": up, "host": "*.localhost"}),
    )
    .await;
    assert_eq!(status, 403, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap_or_default()
            .contains("wildcard"),
        "{err}"
    );
    // A host outside the patterns, even one a service just let go of.
    let (status, _) = register(
        PREVIEW,
        json!({"name": "preview-x", "upstream": up, "host": "api.prod.example"}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, grant) = register(
        ADMIN,
        json!({"name": "www", "upstream": up, "host": "www.prod.example"}),
    )
    .await;
    assert_eq!(status, 201);
    let id = grant["id"].as_str().unwrap_or_default().to_owned();
    let gone = h
        .client
        .delete(h.url(&format!("/api/v1/services/{id}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("delete");
    assert_eq!(gone.status(), 204);
    let (status, _) = register(
        PREVIEW,
        json!({"name": "preview-www", "upstream": up, "host": "www.prod.example"}),
    )
    .await;
    assert_eq!(status, 403, "a freed host is not up for grabs");
    // Hosts inside the patterns.
    for host in ["pr-1.preview.example.com", "preview-1.localhost"] {
        let (status, body) = register(
            PREVIEW,
            json!({"name": format!("preview-{}", &host[..4]), "upstream": up, "host": host}),
        )
        .await;
        assert_eq!(status, 201, "{host}: {body}");
    }
    // Listeners: only inside the range.
    let outside = common::proxies::free_port();
    let (status, err) = register(PREVIEW, json!({"name": "preview-db", "upstream": up, "protocol": "tcp", "listen": format!("127.0.0.1:{outside}")})).await;
    assert_eq!(status, 403, "{err}");
    let (status, err) = register(PREVIEW, json!({"name": "preview-db", "upstream": up, "protocol": "tcp", "listen": format!("127.0.0.1:{port}")})).await;
    assert_eq!(status, 201, "{err}");

    // A prefix alone grants its default host and nothing else.
    let (status, _) = register(BARE, json!({"name": "bare-a", "upstream": up})).await;
    assert_eq!(status, 201);
    let (status, err) = register(
        BARE,
        json!({"name": "bare-b", "upstream": up, "host": "bare-b.example.com"}),
    )
    .await;
    assert_eq!(status, 403, "{err}");
    let (status, _) = register(BARE, json!({"name": "bare-c", "upstream": up, "protocol": "tcp", "listen": format!("127.0.0.1:{outside}")})).await;
    assert_eq!(status, 403);

    // Full access takes a wildcard.
    let (status, err) = register(
        ADMIN,
        json!({"name": "catchall", "upstream": up, "host": "*.example.org"}),
    )
    .await;
    assert_eq!(status, 201, "{err}");
    h.shutdown().await;
}

#[tokio::test]
async fn protected_reads_need_a_token_but_the_public_view_does_not() {
    let dir = tempfile::tempdir().expect("dir");
    let file = tokens(&dir, &format!("{ADMIN}\n{BARE} bare-\n"));
    let h = start_with(move |c| {
        c.token_file = Some(file.clone());
        c.protect_reads = true;
    })
    .await;
    let get = |path: &'static str, token: Option<&'static str>| {
        let mut req = h.client.get(h.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.expect("the API answers").status().as_u16() }
    };
    for path in [
        "/api/v1/services",
        "/api/v1/status",
        "/api/v1/route-errors",
        "/api/v1/plugins",
        "/api/v1/backend",
        "/api/v1/events",
        "/metrics",
    ] {
        assert_eq!(get(path, None).await, 401, "{path} without a token");
        assert_eq!(
            get(path, Some(BARE)).await,
            200,
            "{path} with any valid token"
        );
    }
    for path in ["/healthz", "/api/v1/catalog", "/"] {
        assert_eq!(get(path, None).await, 200, "{path} stays public");
    }
    h.shutdown().await;
}
