//! What the example strategies' end-to-end tests (`example_js`, `example_py`) share: each builds
//! its component with its own toolchain, and from there the component is checked, uploaded,
//! routed through and listed the same way.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::TestHarbor;
use super::proxies::Upstream;

/// Runs `cmd`, failing the test with its output when it fails.
pub fn run(cmd: &mut Command, what: &str) -> String {
    try_run(cmd, what).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `cmd`: its output, or why it did not succeed.
pub fn try_run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{what} failed:\n{text}"))
    }
}

/// An example strategy: plugin `name`, routing the service `service` for the host
/// `{service}.localhost` between two upstreams, `a` and `b`.
pub struct Example {
    /// The plugin's name, as its component declares it (version 0.1.0).
    pub name: &'static str,
    /// The language it is written in, for messages: "ten picks by the {language}".
    pub language: &'static str,
    pub service: &'static str,
    /// How long the upload may take to be checked, where the test bounds it.
    pub upload_within: Option<Duration>,
    /// How long until the guest makes ten picks in a row: its instances are made per picking
    /// thread, and slowly on a cold, busy machine.
    pub picks_within: Duration,
}

impl Example {
    /// The example built into `out` by `build`, passing its check, uploaded to a new daemon and
    /// routing its service: that daemon and the upstreams, or none when the test is skipped.
    pub async fn routing(
        &self,
        out: &Path,
        build: fn(&Path) -> Option<PathBuf>,
    ) -> Option<(TestHarbor, [Upstream; 2])> {
        let out = out.to_owned();
        // Off the runtime: the build takes half a minute.
        let wasm = tokio::task::spawn_blocking(move || build(&out))
            .await
            .expect("the build")?;
        self.passes_its_check(&wasm);
        let h = super::start().await;
        self.upload(&h, &wasm).await;
        let upstreams = self.route_to_two_upstreams(&h).await;
        Some((h, upstreams))
    }

    /// `harbor plugin check` passes `wasm` as this strategy.
    fn passes_its_check(&self, wasm: &Path) {
        let checked = run(
            Command::new(env!("CARGO_BIN_EXE_harbor"))
                .args(["plugin", "check"])
                .arg(wasm),
            "harbor plugin check",
        );
        assert!(
            checked.starts_with(&format!("ok: strategy {} 0.1.0", self.name)),
            "{checked}"
        );
    }

    /// Uploads `wasm` as this plugin, waiting until Harbor has checked it: 201.
    async fn upload(&self, h: &TestHarbor, wasm: &Path) {
        let bytes = std::fs::read(wasm).expect("the component");
        let request = h
            .client
            .put(h.url(&format!("/api/v1/plugins/{}?wait=true", self.name)))
            .header("content-type", "application/wasm")
            .body(bytes)
            .send();
        let resp = match self.upload_within {
            Some(within) => tokio::time::timeout(within, request)
                .await
                .unwrap_or_else(|_| panic!("the upload is checked within {within:?}")),
            None => request.await,
        }
        .expect("the API answers");
        assert_eq!(
            resp.status().as_u16(),
            201,
            "{}",
            resp.text().await.unwrap_or_default()
        );
    }

    /// Registers upstreams `a` and `b` for the service with this strategy; they serve as long
    /// as the returned pair lives.
    async fn route_to_two_upstreams(&self, h: &TestHarbor) -> [Upstream; 2] {
        let upstreams = [Upstream::start("a").await, Upstream::start("b").await];
        for u in &upstreams {
            h.register(json!({
                "name": self.service,
                "upstream": u.addr.to_string(),
                "host": self.host(),
                "strategy": self.name,
                "ttl_secs": 60
            }))
            .await;
        }
        upstreams
    }

    /// The upstreams that served ten requests sent through the proxy one at a time, in order,
    /// once the guest made all ten picks. Until a picking thread's instance is made the host
    /// picks instead, so a round counts only when the guest's pick count rose by ten.
    pub async fn ten_guest_picks(&self, h: &TestHarbor) -> Vec<String> {
        let proxy = h.harbor().proxy_addr().expect("the proxy");
        let client = reqwest::Client::new();
        let host = self.host();
        super::eventually(
            self.picks_within,
            &format!("ten picks by the {}", self.language),
            || {
                let (client, host) = (client.clone(), &host);
                async move {
                    let before = self.guest_picks(&h.metrics().await);
                    let mut served = Vec::new();
                    for _ in 0..10 {
                        let (status, body) =
                            super::proxies::through(&client, proxy, host, "/").await?;
                        assert_eq!(status, 200, "{body}");
                        served.push(body);
                    }
                    (self.guest_picks(&h.metrics().await) - before >= 10).then_some(served)
                }
            },
        )
        .await
    }

    /// This plugin's entry in `GET /api/v1/plugins`; the test fails when it is not there.
    pub async fn listed(&self, h: &TestHarbor) -> Value {
        let (status, list) = h.get("/api/v1/plugins").await;
        assert_eq!(status, 200);
        list["plugins"]
            .as_array()
            .and_then(|plugins| plugins.iter().find(|p| p["name"] == self.name))
            .cloned()
            .unwrap_or_else(|| panic!("{} not listed: {list}", self.name))
    }

    fn host(&self) -> String {
        format!("{}.localhost", self.service)
    }

    /// How many picks this strategy has made, from the Prometheus text `metrics`.
    fn guest_picks(&self, metrics: &str) -> u64 {
        let count = format!(
            "harbor_plugin_pick_seconds_count{{plugin=\"{}\"}}",
            self.name
        );
        metrics
            .lines()
            .find(|l| l.starts_with(&count))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }
}
