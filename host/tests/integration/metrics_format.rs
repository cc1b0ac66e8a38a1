//! `/metrics` checked by Prometheus's own linter, `promtool check metrics`. When `CI=true` the
//! tool is required; elsewhere the test says it was skipped.

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

#[tokio::test]
async fn metrics_pass_promtool() {
    let available = Command::new("promtool").arg("--version").output().is_ok();
    if !available {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is required in CI (Debian package prometheus)"
        );
        eprintln!("SKIPPED: promtool not installed (apt-get install prometheus)");
        return;
    }
    let h = common::start().await;
    // Traffic through the proxy, so that its per-route and per-upstream series are present:
    // a served request, a 404, and a refused upstream.
    let backend = common::upstreams::Backend::echo().await;
    h.register(json!({"name": "api", "upstream": backend.addr.to_string()}))
        .await;
    h.register(json!({"name": "gone", "upstream": "127.0.0.1:1"}))
        .await;
    h.post("/api/v1/services", json!({})).await;
    // Until both routes are in the proxy's table, a request gets the 404 of no route.
    for host in ["api.localhost", "gone.localhost"] {
        common::eventually(Duration::from_secs(2), "the route", || async {
            let status = h
                .client
                .get(h.proxy_base())
                .header("host", host)
                .send()
                .await
                .expect("request through the proxy")
                .status();
            (status != 404).then_some(())
        })
        .await;
    }
    h.client
        .get(h.proxy_base())
        .header("host", "nowhere.localhost")
        .send()
        .await
        .expect("request through the proxy");
    let text = h.metrics().await;
    for series in [
        "harbor_proxy_requests_total{class=\"2xx_3xx\",service=\"api\"",
        "harbor_proxy_request_duration_seconds_count{service=\"api\"",
        "harbor_proxy_errors_total{kind=\"connect\",service=\"gone\"}",
        "harbor_proxy_errors_total{kind=\"no_route\",service=\"\"}",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }

    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejects /metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    h.shutdown().await;
}
