//! `/metrics` checked by Prometheus's own linter, `promtool check metrics`. When `CI=true` the
//! tool is required; elsewhere the test says it was skipped.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

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
    h.register(json!({"name": "api", "upstream": "127.0.0.1:9001"}))
        .await;
    h.post("/api/v1/services", json!({})).await;
    let text = h.metrics().await;

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
