//! Backend benchmark: Harbor driving a real Caddy and a real Envoy, both on loopback.
//!
//! For each proxy it prints the registration-to-routable latency (from the API's `201` until a
//! request through the proxy reaches the new upstream), p50 / p99:
//! - of a new service (Caddy: one config reload; Envoy: new CDS/RDS/EDS files);
//! - for Caddy, of a new instance of an existing service (no reload: dynamic upstreams, DNS);
//!
//! and how many proxy reloads a burst of 1,000 service registrations (32 in flight) causes:
//! for Caddy, config writes to its admin API; for Envoy, accepted LDS/CDS/RDS updates.
//!
//! Run with `cargo bench -p harbor --bench backends` (needs `caddy` and `envoy` on PATH; a
//! missing one is skipped).

#[path = "../tests/common/proxies.rs"]
#[allow(dead_code)]
mod proxies;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures_util::{StreamExt, stream};
use harbor::config::{BackendKind, ListenAddr};
use proxies::{Caddy, Envoy, Upstream};
use serde_json::json;

const SAMPLES: usize = 100;
const BURST: usize = 1_000;

struct Bench {
    harbor: harbor::Harbor,
    api: String,
    client: reqwest::Client,
    proxy: std::net::SocketAddr,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn harbor_with(
    configure: impl FnOnce(&mut harbor::Config),
) -> anyhow::Result<(
    harbor::Harbor,
    String,
    (tempfile::TempDir, tempfile::TempDir),
)> {
    let routes = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let mut config = harbor::Config::new(routes.path(), state.path());
    config.api = vec![ListenAddr::Tcp("127.0.0.1:0".parse()?)];
    configure(&mut config);
    let harbor = harbor::start(config).await?;
    let api = format!("http://{}", harbor.api_addr().context("api addr")?);
    Ok((harbor, api, (routes, state)))
}

impl Bench {
    async fn register(&self, name: &str, upstream: &str) -> anyhow::Result<Instant> {
        let r = self
            .client
            .post(format!("{}/api/v1/services", self.api))
            .json(&json!({"name": name, "upstream": upstream, "ttl_secs": 600, "host": format!("{name}.localhost")}))
            .send()
            .await?;
        let at = Instant::now();
        ensure!(r.status().is_success(), "register {name}: {}", r.status());
        Ok(at)
    }

    /// Polls through the proxy until `host` answers `want`; the time since `from`.
    async fn routable(&self, host: &str, want: &str, from: Instant) -> anyhow::Result<Duration> {
        let deadline = from + Duration::from_secs(10);
        loop {
            if let Some((200, body)) = proxies::through(&self.client, self.proxy, host, "/").await
                && body == want
            {
                return Ok(from.elapsed());
            }
            ensure!(Instant::now() < deadline, "{host} never answered {want}");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }

    async fn new_services(&self, prefix: &str) -> anyhow::Result<Vec<Duration>> {
        let mut out = Vec::new();
        for i in 0..SAMPLES {
            let name = format!("{prefix}{i}");
            let up = Upstream::start(&name).await;
            let at = self.register(&name, &up.addr.to_string()).await?;
            out.push(
                self.routable(&format!("{name}.localhost"), &name, at)
                    .await?,
            );
        }
        Ok(out)
    }

    /// A new instance replacing the only one of an existing service.
    async fn new_instances(&self) -> anyhow::Result<Vec<Duration>> {
        let first = Upstream::start("inst-first").await;
        self.register("inst", &first.addr.to_string()).await?;
        self.routable("inst.localhost", "inst-first", Instant::now())
            .await?;
        let mut previous = first.addr.to_string();
        let mut out = Vec::new();
        let mut keep = vec![first];
        for i in 0..SAMPLES {
            let want = format!("inst-{i}");
            let up = Upstream::start(&want).await;
            let at = self.register("inst", &up.addr.to_string()).await?;
            // Two instances for a moment: requests alternate, so the new one is reached soon.
            out.push(self.routable("inst.localhost", &want, at).await?);
            let list: serde_json::Value = self
                .client
                .get(format!("{}/api/v1/services/inst", self.api))
                .send()
                .await?
                .json()
                .await?;
            if let Some(old) = list["instances"]
                .as_array()
                .and_then(|v| v.iter().find(|i| i["upstream"] == previous.as_str()))
            {
                let id = old["id"].as_str().unwrap_or_default();
                self.client
                    .delete(format!("{}/api/v1/services/{id}", self.api))
                    .send()
                    .await?;
            }
            previous = up.addr.to_string();
            keep.push(up);
            if keep.len() > 2 {
                keep.remove(0);
            }
        }
        Ok(out)
    }

    async fn burst(&self, prefix: &str) -> anyhow::Result<Duration> {
        let up = Upstream::start("burst").await;
        let addr = up.addr.to_string();
        let started = Instant::now();
        let results: Vec<anyhow::Result<Instant>> = stream::iter(0..BURST)
            .map(|i| {
                let (name, addr) = (format!("{prefix}{i}"), addr.clone());
                async move { self.register(&name, &addr).await }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for r in results {
            r?;
        }
        let last = format!("{prefix}{}.localhost", BURST - 1);
        self.routable(&last, "burst", Instant::now()).await?;
        Ok(started.elapsed())
    }
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    format!(
        "p50 {:.1} ms, p99 {:.1} ms (n={})",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        v.len()
    )
}

async fn envoy_updates(admin: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("{admin}/stats?filter=update_success"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("listener_manager.lds.")
                || l.starts_with("cluster_manager.cds.")
                || l.contains(".rds.harbor_routes.")
        })
        .filter_map(|l| l.rsplit_once(": ")?.1.trim().parse::<u64>().ok())
        .sum())
}

async fn bench_caddy() -> anyhow::Result<()> {
    let Some(caddy) = Caddy::start().await else {
        return Ok(());
    };
    let admin = caddy.admin_url().parse().map_err(anyhow::Error::msg)?;
    let listen = caddy.listen_addr();
    let (harbor, api, dirs) = harbor_with(|c| {
        c.backend = BackendKind::Caddy;
        c.caddy_admin = admin;
        c.caddy_listen = listen;
    })
    .await?;
    let b = Bench {
        harbor,
        api,
        client: reqwest::Client::new(),
        proxy: listen,
        _dirs: dirs,
    };
    println!(
        "caddy  new service:  {}",
        percentiles(b.new_services("svc").await?)
    );
    println!(
        "caddy  new instance: {}",
        percentiles(b.new_instances().await?)
    );
    let before = caddy.config_writes();
    let took = b.burst("burst").await?;
    println!(
        "caddy  burst of {BURST} registrations: all routable after {:.0} ms, {} config writes (reloads)",
        took.as_secs_f64() * 1e3,
        caddy.config_writes() - before
    );
    b.harbor.shutdown().await;
    Ok(())
}

async fn bench_envoy() -> anyhow::Result<()> {
    let Some(mut envoy) = Envoy::prepare() else {
        return Ok(());
    };
    let admin = envoy.admin_url().parse().map_err(anyhow::Error::msg)?;
    let (dir, listen) = (envoy.xds.clone(), envoy.listen_addr());
    let (harbor, api, dirs) = harbor_with(|c| {
        c.backend = BackendKind::Envoy;
        c.envoy_admin = admin;
        c.envoy_dir = dir;
        c.proxy_listen = listen;
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !envoy.xds.join("lds.json").exists() {
        ensure!(Instant::now() < deadline, "Harbor wrote no xDS files");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    envoy.start_process().await;
    let b = Bench {
        harbor,
        api,
        client: reqwest::Client::new(),
        proxy: listen,
        _dirs: dirs,
    };
    println!(
        "envoy  new service:  {}",
        percentiles(b.new_services("svc").await?)
    );
    let before = envoy_updates(&envoy.admin_url()).await?;
    let took = b.burst("burst").await?;
    println!(
        "envoy  burst of {BURST} registrations: all routable after {:.0} ms, {} LDS/CDS/RDS updates",
        took.as_secs_f64() * 1e3,
        envoy_updates(&envoy.admin_url()).await? - before
    );
    b.harbor.shutdown().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        bench_caddy().await?;
        bench_envoy().await
    })
}
