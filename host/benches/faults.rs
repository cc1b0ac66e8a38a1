//! Fault-containment benchmark: a daemon serves two routes through its embedded proxy, one
//! balanced by round-robin and one by a hostile test strategy, each with a client sending
//! requests back to back. For each way the strategy misbehaves (switched on by an instance
//! label while traffic flows) it prints:
//! - how long until the first fault was reported, and until the plugin was out of service;
//! - how many of the hostile route's requests failed;
//! - the other route's p50 and p99 while it happened, beside its p99 with nothing wrong.
//!
//! Each case starts with a fresh version of the plugin (a new breaker) and a route of its own.
//! Run with `cargo bench -p harbor --bench faults`.

#[path = "../tests/integration/common/guests.rs"]
mod guests;
#[path = "support/stats.rs"]
#[allow(dead_code)]
mod stats;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures_util::StreamExt;
use harbor::config::ListenAddr;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The ways the strategy misbehaves, by the label value that asks for each.
const CASES: [(&str, &str); 7] = [
    ("loop", "a pick loops"),
    ("hog", "a pick grows memory without bound"),
    ("panic", "a pick panics"),
    ("bad-index", "a pick answers an index out of range"),
    ("none", "a pick answers no backend"),
    ("slow", "every pick takes 5 ms"),
    ("rebuild", "rebuild loops"),
];

/// How long each case runs after the fault is switched on.
const WINDOW: Duration = Duration::from_secs(4);

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

struct Daemon {
    harbor: harbor::Harbor,
    api: String,
    proxy: std::net::SocketAddr,
    client: reqwest::Client,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn run() -> anyhow::Result<()> {
    let routes = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let mut config = harbor::Config::new(routes.path(), state.path());
    config.api = vec![ListenAddr::Tcp("127.0.0.1:0".parse()?)];
    config.proxy_listen = "127.0.0.1:0".parse()?;
    let harbor = harbor::start(config).await?;
    let d = Daemon {
        api: format!("http://{}", harbor.api_addr().context("api addr")?),
        proxy: harbor.proxy_addr().context("proxy addr")?,
        harbor,
        client: reqwest::Client::new(),
        _dirs: (routes, state),
    };
    let upstreams = [upstream("steady").await?, upstream("hostile").await?];
    d.register("steady", upstreams[0], None, None).await?;
    d.until_served("steady").await?;

    let quiet = d.steady_latencies(Duration::from_secs(2)).await;
    let [_, quiet_p99] = p50_p99(&quiet);
    println!(
        "the other route with nothing wrong: p99 {:.2} ms over {} requests\n",
        quiet_p99,
        quiet.len()
    );
    println!(
        "{:<38} {:>13} {:>16} {:>15} {:>13} {:>13}",
        "fault", "first fault", "out of service", "hostile failed", "other p50", "other p99"
    );
    let misbehaving = guests::component("harbor-test-misbehaving", &[]);
    for (n, (mode, what)) in CASES.iter().enumerate() {
        // A fresh version: its own breaker, untouched by the cases before.
        d.upload(guests::variant(&misbehaving, 9000 + n as u32))
            .await?;
        let name = format!("hostile-{mode}");
        d.register(&name, upstreams[1], Some("misbehaving"), None)
            .await?;
        d.until_served(&name).await?;
        let case = d.case(&name, mode, upstreams[1]).await?;
        let [p50, p99] = p50_p99(&case.other);
        let ms = |t: Option<Duration>| {
            t.map_or("never".to_owned(), |t| {
                format!("{:.0} ms", t.as_secs_f64() * 1e3)
            })
        };
        println!(
            "{:<38} {:>13} {:>16} {:>15} {:>10.2} ms {:>10.2} ms",
            what,
            ms(case.first_fault),
            ms(case.disabled),
            format!("{} of {}", case.failed, case.sent),
            p50,
            p99
        );
    }
    println!(
        "\ntimes are from the moment the fault was switched on; the other route's figures cover \
         the {} s that followed",
        WINDOW.as_secs()
    );
    d.harbor.shutdown().await;
    Ok(())
}

/// What one case measured.
struct Case {
    first_fault: Option<Duration>,
    disabled: Option<Duration>,
    failed: u32,
    sent: u32,
    other: Vec<f64>,
}

impl Daemon {
    async fn upload(&self, bytes: Vec<u8>) -> anyhow::Result<()> {
        let r = self
            .client
            .put(format!("{}/api/v1/plugins/misbehaving?wait=true", self.api))
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await?;
        ensure!(r.status().is_success(), "upload: {}", r.text().await?);
        Ok(())
    }

    async fn register(
        &self,
        name: &str,
        upstream: std::net::SocketAddr,
        strategy: Option<&str>,
        mode: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut body = json!({"name": name, "upstream": upstream.to_string(),
            "host": format!("{name}.localhost"), "ttl_secs": 600});
        if let Some(strategy) = strategy {
            body["strategy"] = json!(strategy);
        }
        if let Some(mode) = mode {
            // Another instance of the same upstream, labelled: the route's backends change.
            body["upstream"] = json!(format!("localhost:{}", upstream.port()));
            body["meta"] = json!({ "misbehave": mode });
        }
        let r = self
            .client
            .post(format!("{}/api/v1/services", self.api))
            .json(&body)
            .send()
            .await?;
        ensure!(
            r.status().is_success(),
            "register {name}: {}",
            r.text().await?
        );
        Ok(())
    }

    async fn get(&self, host: &str) -> Result<Duration, ()> {
        self.handle().get(host).await
    }

    async fn until_served(&self, host: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.get(host).await.is_err() {
            ensure!(Instant::now() < deadline, "{host} never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The other route's request times (ms), back to back for `how_long`.
    async fn steady_latencies(&self, how_long: Duration) -> Vec<f64> {
        let until = Instant::now() + how_long;
        let mut out = Vec::new();
        while Instant::now() < until {
            if let Ok(t) = self.get("steady").await {
                out.push(t.as_secs_f64() * 1e3);
            }
        }
        out
    }

    async fn case(
        &self,
        name: &str,
        mode: &str,
        upstream: std::net::SocketAddr,
    ) -> anyhow::Result<Case> {
        let seen = Arc::new(Mutex::new((None, None)));
        let events = self
            .client
            .get(format!("{}/api/v1/events", self.api))
            .send()
            .await?;
        let stop = CancellationToken::new();
        let watcher = tokio::spawn(watch_faults(events, seen.clone(), stop.clone()));
        let hostile = {
            let (d, name, stop) = (self.handle(), name.to_owned(), stop.clone());
            tokio::spawn(async move {
                let (mut failed, mut sent) = (0u32, 0u32);
                while !stop.is_cancelled() {
                    sent += 1;
                    if d.get(&name).await.is_err() {
                        failed += 1;
                    }
                }
                (failed, sent)
            })
        };
        // The fault switched on while both routes carry traffic.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let switched = Instant::now();
        self.register(name, upstream, Some("misbehaving"), Some(mode))
            .await?;
        let other = self.steady_latencies(WINDOW).await;
        stop.cancel();
        let (failed, sent) = hostile.await?;
        watcher.abort();
        let (fault, disabled) = *seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(switched));
        Ok(Case {
            first_fault: since(fault),
            disabled: since(disabled),
            failed,
            sent,
            other,
        })
    }

    fn handle(&self) -> Handle {
        Handle {
            proxy: self.proxy,
            client: self.client.clone(),
        }
    }
}

/// What the hostile route's client needs of the daemon.
struct Handle {
    proxy: std::net::SocketAddr,
    client: reqwest::Client,
}

impl Handle {
    /// `GET /` for `host` through the proxy: how long it took, or that it failed.
    async fn get(&self, host: &str) -> Result<Duration, ()> {
        let began = Instant::now();
        let r = self
            .client
            .get(format!("http://{}/", self.proxy))
            .header("host", format!("{host}.localhost"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|_| ())?;
        if !r.status().is_success() {
            return Err(());
        }
        r.bytes().await.map_err(|_| ())?;
        Ok(began.elapsed())
    }
}

type Seen = Arc<Mutex<(Option<Instant>, Option<Instant>)>>;

/// Notes when the first `plugin_fault` and `plugin_disabled` events arrive.
async fn watch_faults(events: reqwest::Response, seen: Seen, stop: CancellationToken) {
    let mut stream = events.bytes_stream();
    let mut text = String::new();
    while !stop.is_cancelled() {
        let Some(Ok(chunk)) = stream.next().await else {
            return;
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let now = Some(Instant::now());
            let mut seen = match seen.lock() {
                Ok(seen) => seen,
                Err(_) => return,
            };
            if event.contains("event: plugin_fault") && seen.0.is_none() {
                seen.0 = now;
            }
            if event.contains("event: plugin_disabled") && seen.1.is_none() {
                seen.1 = now;
            }
        }
    }
}

fn p50_p99(ms: &[f64]) -> [f64; 2] {
    let mut sorted = ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = |q: f64| {
        sorted
            .get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    [rank(0.5), rank(0.99)]
}

async fn upstream(body: &'static str) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move || async move { body });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}
