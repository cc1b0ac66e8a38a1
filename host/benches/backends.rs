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
//! Churn (Caddy, needs `wrk`): `wrk` loads one service through Caddy in pairs of 2 s windows,
//! one quiet (every churned lease expired) and one churning (instances registering at 50 per
//! second with 1 s leases, measured once as many expire as register), in alternating order. It
//! prints each pair's throughput ratio and Caddy's CPU per request, the ratios' median and
//! quartiles, failed requests and Caddy config writes while churning. It runs four times:
//! with nothing changing (the bench's own noise); with 25 more long-lived instances of the
//! loaded service instead of churn (what instances cost Caddy); with half of the churning
//! instances belonging to the loaded service (the case); then with all of them
//! belonging to two other services. A pair in which the hypervisor stole 10 % of the machine's
//! time or more is printed but left out of the summary. Churn runs first, on a Caddy and a
//! Harbor of its own, so that the services the other parts register are not part of its case.
//!
//! Run with `cargo bench -p harbor --bench backends` (needs `caddy` and `envoy` on PATH; a
//! missing one is skipped); `-- churn`, `-- latency` or `-- burst` runs one part.

#[path = "../tests/integration/common/proxies.rs"]
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
use proxies::{Caddy, Envoy, Release, Upstream};
use serde_json::json;

const SAMPLES: usize = 100;
const BURST: usize = 1_000;
/// Long enough for Caddy to have refreshed its SRV answers (every 100 ms) after a change.
const CADDY_SEES_DNS: Duration = Duration::from_millis(250);

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
        self.register_for(name, upstream, 600).await
    }

    async fn register_for(&self, name: &str, upstream: &str, ttl: u64) -> anyhow::Result<Instant> {
        let r = self
            .client
            .post(format!("{}/api/v1/services", self.api))
            .json(&json!({"name": name, "upstream": upstream, "ttl_secs": ttl, "host": format!("{name}.localhost")}))
            .send()
            .await?;
        let at = Instant::now();
        ensure!(r.status().is_success(), "register {name}: {}", r.status());
        Ok(at)
    }

    /// Waits until every churned instance's lease has expired (each service back to its one
    /// long-lived instance), and for Caddy to have seen it.
    async fn churn_gone(&self) -> anyhow::Result<()> {
        for name in ["hot", "cold", "cool"] {
            self.instances_until(name, |n| n <= 1).await?;
        }
        tokio::time::sleep(CADDY_SEES_DNS).await;
        Ok(())
    }

    /// Waits until `name` has `count` live instances or more, and for Caddy to have seen them.
    async fn instances_seen(&self, name: &str, count: usize) -> anyhow::Result<()> {
        self.instances_until(name, |n| n >= count).await?;
        tokio::time::sleep(CADDY_SEES_DNS).await;
        Ok(())
    }

    /// The service as the API shows it.
    async fn service(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        Ok(self
            .client
            .get(format!("{}/api/v1/services/{name}", self.api))
            .send()
            .await?
            .json()
            .await?)
    }

    async fn instances_until(
        &self,
        name: &str,
        done: impl Fn(usize) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let view = self.service(name).await?;
            let live = view["instances"].as_array().map_or(0, Vec::len);
            if done(live) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{name} stayed at {live} instances"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
            let list = self.service("inst").await?;
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

/// A Caddy of its own and a Harbor driving it; none when Caddy is not installed.
async fn caddy_bench(release: Release) -> anyhow::Result<Option<(Caddy, Bench)>> {
    let Some(caddy) = Caddy::start(release).await else {
        return Ok(None);
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
    Ok(Some((caddy, b)))
}

/// Each part against Debian's Caddy 2.6 and the current release, one after the other.
async fn bench_caddy() -> anyhow::Result<()> {
    for release in [Release::Debian, Release::Current] {
        bench_caddy_release(release).await?;
    }
    Ok(())
}

async fn bench_caddy_release(release: Release) -> anyhow::Result<()> {
    // Churn gets a Caddy and a Harbor of their own: the services the other parts leave behind
    // (a hundred routes in Caddy, their instances in Harbor's registry) would make it measure
    // a different case from the one it describes.
    if wanted("churn")
        && let Some((caddy, b)) = caddy_bench(release).await?
    {
        churn(&b, &caddy).await?;
        b.harbor.shutdown().await;
    }
    let Some((caddy, b)) = caddy_bench(release).await? else {
        return Ok(());
    };
    if wanted("latency") {
        println!(
            "caddy {} new service:  {}",
            caddy.version,
            percentiles(b.new_services("svc").await?)
        );
        println!(
            "caddy {} new instance: {}",
            caddy.version,
            percentiles(b.new_instances().await?)
        );
    }
    if wanted("burst") {
        let before = caddy.config_writes();
        let took = b.burst("burst").await?;
        println!(
            "caddy {} burst of {BURST} registrations: all routable after {:.0} ms, {} config writes (reloads)",
            caddy.version,
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
        println!(
            "caddy {} churn: skipped, wrk is not installed",
            caddy.version
        );
        return Ok(());
    }
    let (hot, cold, cool) = (
        Upstream::start("hot").await,
        Upstream::start("cold").await,
        Upstream::start("cool").await,
    );
    for (name, up) in [("hot", &hot), ("cold", &cold), ("cool", &cool)] {
        b.register(name, &up.addr.to_string()).await?;
    }
    b.routable("hot.localhost", "hot", Instant::now()).await?;
    // Live servers for the churning instances: a request sent to one succeeds.
    let mut pool = Vec::new();
    for _ in 0..60 {
        pool.push(Upstream::start("churn").await);
    }
    let pool: Vec<String> = pool.iter().map(|u| u.addr.to_string()).collect();
    // First the noise floor: the same windows with nothing changing. Then what the loaded
    // service's extra instances cost Caddy with no churn at all; then the case, half of
    // the churn being instances of the loaded service; then the same churn on two other
    // services only.
    for (change, what) in [
        (Change::Nothing, "control, nothing changes"),
        (
            Change::Instances,
            "25 more long-lived instances of the loaded service, no churn",
        ),
        (
            Change::Churn("hot"),
            "churn, half of it instances of the loaded service",
        ),
        (
            Change::Churn("cool"),
            "churn, all of it instances of other services",
        ),
    ] {
        churn_mix(b, caddy, &pool, change, what).await?;
    }
    Ok(())
}

/// What the second window of a pair changes from the quiet one.
#[derive(Clone, Copy)]
enum Change {
    /// Nothing: the pairs show the bench's own noise.
    Nothing,
    /// 25 instances of the loaded service register with a 4 s lease, as many as churn keeps
    /// live: what more instances cost, apart from churning them.
    Instances,
    /// Churn: every 20 ms an instance registers with a 1 s lease, alternately of this service
    /// (even pool addresses) and of `cold` (odd ones), so each address comes back 1.2 s later,
    /// after its lease expired.
    Churn(&'static str),
}

/// Pairs of `wrk` windows on `hot`, one quiet and one with `change`, taken in alternating order
/// so that whatever favours the second window of a pair cancels out.
async fn churn_mix(
    b: &Bench,
    caddy: &Caddy,
    pool: &[String],
    change: Change,
    what: &str,
) -> anyhow::Result<()> {
    const PAIRS: usize = 10;
    const SECS: u64 = 2;
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
                let Change::Churn(partner) = change else {
                    continue;
                };
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
    wrk_window(b.proxy, "hot.localhost", 1).await?;
    let caddy_pid = caddy.pid().map(|p| p.to_string()).unwrap_or_default();
    let (mut ratios, mut failed, mut writes) = (Vec::new(), 0, 0);
    for pair in 0..PAIRS {
        let mut quiet = None;
        let mut busy = None;
        for churn in [pair % 2 == 1, pair % 2 == 0] {
            churning.store(churn, std::sync::atomic::Ordering::Relaxed);
            match (churn, change) {
                (false, _) => b.churn_gone().await?,
                (true, Change::Instances) => {
                    for addr in &pool[..25] {
                        b.register_for("hot", addr, 4).await?;
                    }
                    b.instances_seen("hot", 26).await?;
                }
                // One lease: from here as many instances expire as register.
                (true, _) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
            let before = caddy.config_writes();
            let w = Window::measure(b.proxy, &caddy_pid, SECS).await?;
            if churn {
                writes += caddy.config_writes() - before;
            }
            failed += w.failed;
            *(if churn { &mut busy } else { &mut quiet }) = Some(w);
        }
        churning.store(false, std::sync::atomic::Ordering::Relaxed);
        let (Some(quiet), Some(busy)) = (quiet, busy) else {
            continue;
        };
        let calm = quiet.stolen.max(busy.stolen) < MAX_STOLEN_PCT;
        println!(
            "caddy {} churn pair ({}): quiet {:.0} req/s, changed {:.0} req/s ({:.0} %){}; Caddy µs CPU/request {:.0} / {:.0}; this process (Harbor, upstreams, churn client) CPU ms {} / {}; machine {} / {}",
            caddy.version,
            if pair % 2 == 1 {
                "changed first"
            } else {
                "quiet first"
            },
            quiet.rate,
            busy.rate,
            100.0 * busy.rate / quiet.rate,
            if calm { "" } else { " [left out: stolen]" },
            quiet.caddy_us_per_request,
            busy.caddy_us_per_request,
            quiet.self_ms,
            busy.self_ms,
            quiet.machine,
            busy.machine,
        );
        if calm {
            ratios.push(busy.rate / quiet.rate);
        }
    }
    stop.cancel();
    let (registered, refused) = task.await?;
    let calm_pairs = ratios.len();
    let summary = stats::quartiles(ratios).map_or_else(
        || String::from("no window pair was calm enough to tell"),
        |[low, median, high]| {
            format!(
                "{:.0} % of quiet (quartiles {:.0}–{:.0} %)",
                100.0 * median,
                100.0 * low,
                100.0 * high
            )
        },
    );
    println!(
        "caddy {} churn, {what}: {registered} churn registrations in {} s ({refused} refused); throughput, median of {calm_pairs} calm window pairs out of {PAIRS}: {summary}; {failed} failed requests; {writes} Caddy config writes in changed windows",
        caddy.version,
        // Churn runs through each changed window and the lease before it.
        PAIRS as u64 * (SECS + 1),
    );
    b.churn_gone().await
}

/// One measured `wrk` window and what the machine did meanwhile.
struct Window {
    rate: f64,
    failed: u64,
    caddy_us_per_request: f64,
    self_ms: u128,
    /// Idle and stolen shares of the machine, for the printout.
    machine: String,
    /// The stolen share alone: a window the hypervisor starved measures the neighbours, not
    /// Caddy.
    stolen: f64,
}

impl Window {
    async fn measure(
        proxy: std::net::SocketAddr,
        caddy_pid: &str,
        secs: u64,
    ) -> anyhow::Result<Window> {
        let (own, caddy, ticks) = (cpu_time("self"), cpu_time(caddy_pid), MachineTicks::now());
        let (rate, failed) = wrk_window(proxy, "hot.localhost", secs).await?;
        let (own, caddy) = (cpu_time("self") - own, cpu_time(caddy_pid) - caddy);
        let (machine, stolen) = match (ticks, MachineTicks::now()) {
            (Some(before), Some(now)) => {
                let stolen = now.steal_pct_since(&before);
                (
                    format!(
                        "{:.0} % idle, {stolen:.0} % stolen",
                        now.idle_pct_since(&before)
                    ),
                    stolen,
                )
            }
            _ => (String::from("?"), 0.0),
        };
        Ok(Window {
            rate,
            failed,
            caddy_us_per_request: caddy.as_secs_f64() * 1e6 / (rate * secs as f64).max(1.0),
            self_ms: own.as_millis(),
            machine,
            stolen,
        })
    }
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
