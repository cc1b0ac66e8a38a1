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
//! Churn (Caddy, needs `wrk`): `wrk` loads one service through Caddy in 2 s windows that
//! alternate between quiet and churning (instances registering at 50 per second with 1 s
//! leases, so as many expire); it prints each pair's throughput ratio and Caddy's CPU per
//! request, their median, failed requests and Caddy config writes during the churn. It runs
//! twice: with half of the churning instances belonging to the loaded service (the issue's
//! case), then with all of them belonging to two other services. A pair in which the hypervisor
//! stole 10 % of the machine's time or more is printed but left out of the median.
//!
//! Run with `cargo bench -p harbor --bench backends` (needs `caddy` and `envoy` on PATH; a
//! missing one is skipped); `-- churn`, `-- latency` or `-- burst` runs one part.

#[path = "../tests/common/proxies.rs"]
#[allow(dead_code)]
mod proxies;

#[path = "support/machine.rs"]
mod machine;
#[path = "support/stats.rs"]
mod stats;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures_util::{StreamExt, stream};
use harbor::config::{BackendKind, ListenAddr};
use machine::{MAX_STOLEN_PCT, MachineTicks};
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
    if wanted("latency") {
        println!(
            "caddy  new service:  {}",
            percentiles(b.new_services("svc").await?)
        );
        println!(
            "caddy  new instance: {}",
            percentiles(b.new_instances().await?)
        );
    }
    if wanted("churn") {
        churn(&b, &caddy).await?;
    }
    if wanted("burst") {
        let before = caddy.config_writes();
        let took = b.burst("burst").await?;
        println!(
            "caddy  burst of {BURST} registrations: all routable after {:.0} ms, {} config writes (reloads)",
            took.as_secs_f64() * 1e3,
            caddy.config_writes() - before
        );
    }
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
    if wanted("latency") {
        println!(
            "envoy  new service:  {}",
            percentiles(b.new_services("svc").await?)
        );
    }
    if wanted("burst") {
        let before = envoy_updates(&envoy.admin_url()).await?;
        let took = b.burst("burst").await?;
        println!(
            "envoy  burst of {BURST} registrations: all routable after {:.0} ms, {} LDS/CDS/RDS updates",
            took.as_secs_f64() * 1e3,
            envoy_updates(&envoy.admin_url()).await? - before
        );
    }
    b.harbor.shutdown().await;
    Ok(())
}

/// One `wrk` window against `host` through `proxy`: requests per second and failed requests
/// (non-2xx answers and socket errors).
async fn wrk_window(
    proxy: std::net::SocketAddr,
    host: &str,
    secs: u64,
) -> anyhow::Result<(f64, u64)> {
    let out = tokio::process::Command::new("wrk")
        .args([
            "-t1",
            "-c8",
            &format!("-d{secs}s"),
            "-H",
            &format!("Host: {host}"),
        ])
        .arg(format!("http://{proxy}/"))
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let number = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|v| v.split_whitespace().next().unwrap_or("0").to_owned())
    };
    let rate: f64 = number("Requests/sec:")
        .context(format!("no rate in wrk's output:\n{text}"))?
        .parse()?;
    let non_2xx: u64 = number("Non-2xx or 3xx responses:").map_or(Ok(0), |v| v.parse())?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let socket: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map_or(0, |l| {
            l.split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        });
    Ok((rate, non_2xx + socket))
}

/// CPU time a process has used so far (user + system), from `/proc/PID/stat`.
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at the state, field 3;
    // utime and stime are fields 14 and 15, in clock ticks of 1/100 s on Linux.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

async fn churn(b: &Bench, caddy: &Caddy) -> anyhow::Result<()> {
    if std::process::Command::new("wrk")
        .arg("-v")
        .output()
        .is_err()
    {
        println!("caddy  churn: skipped, wrk is not installed");
        return Ok(());
    }
    let (hot, cold, cool) = (
        Upstream::start("hot").await,
        Upstream::start("cold").await,
        Upstream::start("cool").await,
    );
    b.register("hot", &hot.addr.to_string()).await?;
    b.register("cold", &cold.addr.to_string()).await?;
    b.register("cool", &cool.addr.to_string()).await?;
    b.routable("hot.localhost", "hot", Instant::now()).await?;
    // Live servers for the churning instances: a request sent to one succeeds.
    let mut pool = Vec::new();
    for _ in 0..60 {
        pool.push(Upstream::start("churn").await);
    }
    let pool: Vec<String> = pool.iter().map(|u| u.addr.to_string()).collect();
    // The case: half of the churn is instances of the loaded service itself. Then the
    // same churn on two other services, which separates what churning costs from what the
    // loaded service's extra instances cost Caddy on every request.
    churn_mix(
        b,
        caddy,
        &pool,
        "hot",
        "half of them instances of the loaded service",
    )
    .await?;
    churn_mix(
        b,
        caddy,
        &pool,
        "cool",
        "all of them instances of other services",
    )
    .await
}

/// Alternating quiet and churning windows while `wrk` loads `hot`: every 20 ms an instance
/// registers with a 1 s lease, alternately of `partner` (even pool addresses) and of `cold`
/// (odd ones), so each address comes back 1.2 s later, after its lease expired.
async fn churn_mix(
    b: &Bench,
    caddy: &Caddy,
    pool: &[String],
    partner: &'static str,
    what: &str,
) -> anyhow::Result<()> {
    let churning = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = tokio_util::sync::CancellationToken::new();
    let task = {
        let (client, api, churning, stop) = (
            b.client.clone(),
            b.api.clone(),
            churning.clone(),
            stop.clone(),
        );
        let addrs = pool.to_vec();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let (mut n, mut failed) = (0usize, 0u64);
            while !stop.is_cancelled() {
                tick.tick().await;
                if !churning.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                let name = if n % 2 == 0 { partner } else { "cold" };
                let r = client
                    .post(format!("{api}/api/v1/services"))
                    .json(&json!({"name": name, "upstream": addrs[n % addrs.len()], "ttl_secs": 1, "host": format!("{name}.localhost")}))
                    .send()
                    .await;
                if !r.is_ok_and(|r| r.status().is_success()) {
                    failed += 1;
                }
                n += 1;
            }
            (n, failed)
        })
    };
    let (rounds, secs) = (5, 2);
    let (mut ratios, mut failed, mut writes) = (Vec::new(), 0, 0);
    wrk_window(b.proxy, "hot.localhost", 1).await?;
    let caddy_pid = caddy.pid().map(|p| p.to_string()).unwrap_or_default();
    let cpu = || (cpu_time("self"), cpu_time(&caddy_pid));
    let ms = |(a, b): (Duration, Duration), (c, d): (Duration, Duration)| {
        ((c - a).as_millis(), (d - b).as_millis())
    };
    // Idle and stolen shares of the machine, and the stolen share alone: a window the
    // hypervisor starved measures the neighbours, not Caddy.
    let machine = |before: Option<MachineTicks>| {
        let (Some(before), Some(now)) = (before, MachineTicks::now()) else {
            return (String::from("?"), 0.0);
        };
        let stolen = now.steal_pct_since(&before);
        (
            format!(
                "{:.0} % idle, {stolen:.0} % stolen",
                now.idle_pct_since(&before)
            ),
            stolen,
        )
    };
    // Caddy's CPU per request, in µs.
    let per_request = |ms: u128, rate: f64| ms as f64 * 1e3 / (rate * secs as f64).max(1.0);
    for _ in 0..rounds {
        let (start, ticks) = (cpu(), MachineTicks::now());
        let (quiet, f) = wrk_window(b.proxy, "hot.localhost", secs).await?;
        let (quiet_self, quiet_caddy) = ms(start, cpu());
        let (quiet_machine, quiet_stolen) = machine(ticks);
        failed += f;
        churning.store(true, std::sync::atomic::Ordering::Relaxed);
        let before = caddy.config_writes();
        let (start, ticks) = (cpu(), MachineTicks::now());
        let (busy, f) = wrk_window(b.proxy, "hot.localhost", secs).await?;
        let (busy_self, busy_caddy) = ms(start, cpu());
        let (busy_machine, busy_stolen) = machine(ticks);
        writes += caddy.config_writes() - before;
        churning.store(false, std::sync::atomic::Ordering::Relaxed);
        failed += f;
        let calm = quiet_stolen.max(busy_stolen) < MAX_STOLEN_PCT;
        println!(
            "caddy  churn window: quiet {quiet:.0} req/s, churning {busy:.0} req/s ({:.0} %){}; Caddy µs CPU/request {:.0} / {:.0}; this process (Harbor, upstreams, churn client) CPU ms {quiet_self} / {busy_self}; machine {quiet_machine} / {busy_machine}",
            100.0 * busy / quiet,
            if calm { "" } else { " [left out: stolen]" },
            per_request(quiet_caddy, quiet),
            per_request(busy_caddy, busy),
        );
        if calm {
            ratios.push(busy / quiet);
        }
    }
    stop.cancel();
    let (registered, refused) = task.await?;
    let calm_pairs = ratios.len();
    let median = stats::median(ratios).map_or_else(
        || String::from("no window pair was calm enough to tell"),
        |r| format!("{:.0} % of quiet", 100.0 * r),
    );
    println!(
        "caddy  churn, {what}: {registered} registrations in {} s ({refused} refused); throughput under churn, median of {} calm window pairs out of {rounds}: {median}; {failed} failed requests; {writes} Caddy config writes",
        rounds * secs,
        calm_pairs,
    );
    // Let the last window's instances expire before whatever runs next.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    Ok(())
}

/// Whether the command line asks for `part` (no part named: every part).
fn wanted(part: &str) -> bool {
    let parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    parts.is_empty() || parts.iter().any(|p| p == part)
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
