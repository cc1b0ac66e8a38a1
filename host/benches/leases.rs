//! Lease scale benchmark: a real Harbor daemon in-process, driven over its HTTP API.
//!
//! Phases:
//! 1. register 10,000 instances (1,000 services x 10) with long leases;
//! 2. renew all of them;
//! 3. with those 10,000 leases live, register 2,000 more with 1-3 s leases, never renew them, and
//!    measure how late each `instance_expired` event reaches an SSE subscriber, relative to the
//!    `expires_at` the daemon granted.
//!
//! Every registration and renewal is acknowledged only once it is on disk (the journal's group
//! commit); the summary prints the syncs each phase cost and, beside each rate, the rate measured
//! before acknowledgements waited for the disk.
//!
//! Run with `cargo bench -p harbor --bench leases`. It is a benchmark, not a test: a missed goal
//! is reported, not a failure. Missing events, wrong status codes or a stuck phase are failures.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail, ensure};
use futures_util::{Stream, StreamExt, TryStreamExt, stream};
use harbor::config::ListenAddr;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The long-lived population: 1,000 services x 10 instances.
const SERVICES: usize = 1_000;
const INSTANCES_PER_SERVICE: usize = 10;
/// Long enough that none of them can expire while the benchmark runs.
const LONG_TTL_SECS: u64 = 600;

/// The expiring population. Ten instances per service keeps the event count (one
/// `service_added`/`service_removed` per service) well inside the daemon's 4,096-event ring, so a
/// subscriber that briefly lags is not forced back to a snapshot.
const EXPIRING: usize = 2_000;
const EXPIRING_PER_SERVICE: usize = 10;
/// TTLs are spread over 1, 2 and 3 s so expiries come in three waves, not one.
const EXPIRING_TTLS_SECS: [u64; 3] = [1, 2, 3];

/// Requests in flight at once; the client keeps this many keep-alive connections.
const CONCURRENCY: usize = 32;
/// Upstream ports start here; an instance's index within its service picks the port.
const BASE_PORT: u16 = 20_000;

/// Bounds, so that a wedged daemon ends the benchmark instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);
/// From the start of the expiring registrations until every expiry must have been seen.
const EXPIRY_DEADLINE: Duration = Duration::from_secs(15);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

const GOAL_P99_MS: f64 = 10.0;
/// Durable registrations per second this machine should take.
const GOAL_REGISTER_PER_SEC: f64 = 5_000.0;
/// The rates before acknowledgements waited for the disk (saved 500 ms later, whole file).
const BEFORE_REGISTER_PER_SEC: f64 = 21_552.0;
const BEFORE_RENEW_PER_SEC: f64 = 23_451.0;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot build the tokio runtime")?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let routes = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let mut config = harbor::Config::new(routes.path(), state.path());
    config.api = vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))];
    let harbor = harbor::start(config).await?;
    let addr = harbor
        .api_addr()
        .context("the daemon has no TCP API listener")?;
    println!("harbor listening on {addr}");

    // The daemon is stopped whatever the phases did, so a failure still ends the process cleanly.
    let result = phases(&format!("http://{addr}")).await;
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, harbor.shutdown())
        .await
        .is_err()
    {
        eprintln!("warning: the daemon did not shut down within {SHUTDOWN_TIMEOUT:?}");
    }
    result
}

async fn phases(base: &str) -> anyhow::Result<()> {
    let client = api_client()?;

    let specs = long_lived_specs();
    let fsyncs_at_start = metric(&client, base, "harbor_state_fsyncs_total").await?;
    let (grants, register_time) =
        timed(bounded("register", register_all(&client, base, specs))).await?;
    let fsyncs_registering = metric(&client, base, "harbor_state_fsyncs_total").await?;
    let register = Throughput::new("register", grants.len(), register_time).with_syncs(
        fsyncs_registering - fsyncs_at_start,
        BEFORE_REGISTER_PER_SEC,
    );
    register.print();

    let ids: Vec<String> = grants.into_iter().map(|g| g.id).collect();
    let (renewed, renew_time) = timed(bounded("renew", renew_all(&client, base, &ids))).await?;
    let fsyncs_renewing = metric(&client, base, "harbor_state_fsyncs_total").await?;
    let renew = Throughput::new("renew", renewed, renew_time)
        .with_syncs(fsyncs_renewing - fsyncs_registering, BEFORE_RENEW_PER_SEC);
    renew.print();

    let lateness = bounded("expiry", expiry_phase(&client, base, ids.len())).await?;
    lateness.print();

    print_metric_lines(&client, base).await?;

    println!();
    println!("summary");
    println!(
        "{:<10} {:>7} {:>10} {:>12} {:>10} {:>14} {:>7}",
        "phase", "count", "seconds", "per second", "fsyncs/s", "before (/s)", "ratio"
    );
    for t in [&register, &renew] {
        println!(
            "{:<10} {:>7} {:>10.3} {:>12.0} {:>10.0} {:>14.0} {:>7.2}",
            t.phase,
            t.count,
            t.elapsed.as_secs_f64(),
            t.rate(),
            t.syncs / t.elapsed.as_secs_f64(),
            t.before,
            t.rate() / t.before
        );
    }
    let verdict = if register.rate() >= GOAL_REGISTER_PER_SEC {
        "met"
    } else {
        "MISSED"
    };
    println!(
        "goal: at least {GOAL_REGISTER_PER_SEC} durable registrations/s — measured {:.0}/s ({verdict})",
        register.rate()
    );
    println!(
        "{:<10} {:>7}   lateness ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        "expiry", lateness.count, lateness.p50, lateness.p90, lateness.p99, lateness.max
    );
    let verdict = if lateness.p99 <= GOAL_P99_MS {
        "met"
    } else {
        "MISSED"
    };
    println!(
        "goal: expiry lateness p99 <= {GOAL_P99_MS} ms with 10,000 live leases — measured p99 {:.2} ms ({verdict})",
        lateness.p99
    );
    Ok(())
}

/// One keep-alive pool for all API calls; each call has its own timeout.
fn api_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(CONCURRENCY)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("cannot build the HTTP client")
}

/// A client for the event stream: no overall timeout, since the stream is meant to stay open;
/// the reader bounds it with its own deadline instead.
fn stream_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(REQUEST_TIMEOUT)
        .build()
        .context("cannot build the event stream client")
}

async fn timed<T>(work: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<(T, Duration)> {
    let start = Instant::now();
    let value = work.await?;
    Ok((value, start.elapsed()))
}

async fn bounded<T>(
    phase: &str,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(PHASE_TIMEOUT, work)
        .await
        .with_context(|| format!("phase {phase} did not finish within {PHASE_TIMEOUT:?}"))?
        .with_context(|| format!("phase {phase} failed"))
}

// ---------------------------------------------------------------------------------------------
// Registration and renewal

/// One registration to send.
struct Spec {
    name: String,
    port: u16,
    ttl_secs: u64,
}

/// The daemon's answer to a registration or renewal.
#[derive(Deserialize)]
struct Grant {
    id: String,
    lease: Lease,
}

#[derive(Deserialize)]
struct Lease {
    expires_at: String,
}

fn long_lived_specs() -> Vec<Spec> {
    (0..SERVICES * INSTANCES_PER_SERVICE)
        .map(|i| Spec {
            name: format!("svc-{}", i / INSTANCES_PER_SERVICE),
            port: instance_port(i % INSTANCES_PER_SERVICE),
            ttl_secs: LONG_TTL_SECS,
        })
        .collect()
}

fn expiring_specs() -> Vec<Spec> {
    (0..EXPIRING)
        .map(|i| Spec {
            name: format!("expiring-{}", i / EXPIRING_PER_SERVICE),
            port: instance_port(i % EXPIRING_PER_SERVICE),
            ttl_secs: EXPIRING_TTLS_SECS[i % EXPIRING_TTLS_SECS.len()],
        })
        .collect()
}

/// Distinct ports within a service, so each registration is a new instance and not a renewal.
fn instance_port(index: usize) -> u16 {
    BASE_PORT + u16::try_from(index).expect("instance index fits a port offset")
}

/// Sends every registration, `CONCURRENCY` at a time; each must create a new instance.
async fn register_all(
    client: &reqwest::Client,
    base: &str,
    specs: Vec<Spec>,
) -> anyhow::Result<Vec<Grant>> {
    let url = format!("{base}/api/v1/services");
    stream::iter(specs)
        .map(|spec| register_one(client, &url, spec))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
}

async fn register_one(client: &reqwest::Client, url: &str, spec: Spec) -> anyhow::Result<Grant> {
    let body = json!({
        "name": spec.name,
        "upstream": format!("127.0.0.1:{}", spec.port),
        "ttl_secs": spec.ttl_secs,
    });
    let response = client.post(url).json(&body).send().await?;
    let status = response.status();
    // 201 and not 200: a 200 would mean the daemon took this for a renewal of an existing one.
    if status != reqwest::StatusCode::CREATED {
        let text = response.text().await.unwrap_or_default();
        bail!(
            "registering {}:{} answered {status} (expected 201 Created): {text}",
            spec.name,
            spec.port
        );
    }
    response
        .json()
        .await
        .with_context(|| format!("registering {}:{}: bad response body", spec.name, spec.port))
}

/// Renews every lease, `CONCURRENCY` at a time; returns how many were renewed.
async fn renew_all(client: &reqwest::Client, base: &str, ids: &[String]) -> anyhow::Result<usize> {
    stream::iter(ids)
        .map(|id| renew_one(client, base, id))
        .buffer_unordered(CONCURRENCY)
        .try_fold(0, |n, ()| async move { Ok(n + 1) })
        .await
}

async fn renew_one(client: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<()> {
    let response = client
        .put(format!("{base}/api/v1/services/{id}/lease"))
        .send()
        .await?;
    let status = response.status();
    // Reading the body to the end lets the connection go back to the pool.
    let text = response.text().await?;
    ensure!(
        status == reqwest::StatusCode::OK,
        "renewing {id} answered {status} (expected 200 OK): {text}"
    );
    Ok(())
}

struct Throughput {
    phase: &'static str,
    count: usize,
    elapsed: Duration,
    syncs: f64,
    before: f64,
}

impl Throughput {
    fn new(phase: &'static str, count: usize, elapsed: Duration) -> Self {
        Self {
            phase,
            count,
            elapsed,
            syncs: 0.0,
            before: f64::NAN,
        }
    }

    /// The journal syncs the phase cost, and the rate measured before they were waited for.
    fn with_syncs(mut self, syncs: f64, before: f64) -> Self {
        self.syncs = syncs;
        self.before = before;
        self
    }

    fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self) {
        println!(
            "{}: {} in {:.3} s = {:.0}/s ({CONCURRENCY} in flight)",
            self.phase,
            self.count,
            self.elapsed.as_secs_f64(),
            self.rate()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Expiry

/// Subscribes, registers the short leases, waits for every expiry and measures its lateness.
async fn expiry_phase(
    client: &reqwest::Client,
    base: &str,
    live: usize,
) -> anyhow::Result<Lateness> {
    let mut events = SseReader::new(Box::pin(subscribe(base).await?.bytes_stream()));
    let snapshot = events
        .next_event_within(Instant::now() + SNAPSHOT_TIMEOUT)
        .await?
        .context("the event stream ended before its snapshot")?;
    ensure!(
        snapshot.kind == "snapshot",
        "the event stream began with {:?}, not a snapshot",
        snapshot.kind
    );
    let (services, instances) = count_snapshot(&snapshot.data)?;
    println!("expiry: subscribed; snapshot holds {services} services, {instances} instances");
    ensure!(
        instances == live,
        "the snapshot shows {instances} live instances, expected {live}"
    );

    // The reader runs alongside the registrations, so expiries are timestamped as they arrive.
    let deadline = Instant::now() + EXPIRY_DEADLINE;
    let collector: JoinHandle<anyhow::Result<Collected>> =
        tokio::spawn(collect_expiries(events, EXPIRING, deadline));

    let registered = register_all(client, base, expiring_specs()).await;
    let grants = match registered {
        Ok(grants) => grants,
        Err(e) => {
            collector.abort();
            return Err(e);
        }
    };
    let collected = collector.await.context("the event reader panicked")??;
    if collected.resnapshots > 0 {
        eprintln!(
            "warning: the event stream fell behind the daemon's ring {} time(s) and was sent a \
             fresh snapshot; expiries in those gaps were not seen",
            collected.resnapshots
        );
    }
    lateness(&grants, &collected.arrivals)
}

/// Opens the event stream; the body is read by an [`SseReader`].
async fn subscribe(base: &str) -> anyhow::Result<reqwest::Response> {
    let response = stream_client()?
        .get(format!("{base}/api/v1/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .context("cannot open the event stream")?;
    ensure!(
        response.status() == reqwest::StatusCode::OK,
        "the event stream answered {}",
        response.status()
    );
    Ok(response)
}

/// Services and instances in a snapshot event.
fn count_snapshot(data: &str) -> anyhow::Result<(usize, usize)> {
    let snapshot: Value = serde_json::from_str(data).context("the snapshot is not JSON")?;
    let services = snapshot["services"]
        .as_array()
        .context("the snapshot has no services array")?;
    let instances = services
        .iter()
        .map(|s| s["instances"].as_array().map_or(0, Vec::len))
        .sum();
    Ok((services.len(), instances))
}

/// What the reader saw: when each expiry arrived, by instance id.
struct Collected {
    arrivals: HashMap<String, SystemTime>,
    resnapshots: usize,
}

/// Reads events until `expected` expiries have arrived or the deadline passes.
async fn collect_expiries<S, B>(
    mut events: SseReader<S>,
    expected: usize,
    deadline: Instant,
) -> anyhow::Result<Collected>
where
    S: Stream<Item = reqwest::Result<B>> + Unpin,
    B: AsRef<[u8]>,
{
    let mut collected = Collected {
        arrivals: HashMap::with_capacity(expected),
        resnapshots: 0,
    };
    while collected.arrivals.len() < expected {
        let Some(event) = events.next_event_within(deadline).await? else {
            break;
        };
        match event.kind.as_str() {
            "instance_expired" => {
                let data: Value = serde_json::from_str(&event.data).with_context(|| {
                    format!("instance_expired data is not JSON: {}", event.data)
                })?;
                let id = data["id"]
                    .as_str()
                    .with_context(|| format!("instance_expired without an id: {}", event.data))?;
                collected.arrivals.insert(id.to_owned(), event.arrived);
            }
            "snapshot" => collected.resnapshots += 1,
            _ => {}
        }
    }
    Ok(collected)
}

/// Expiry lateness in milliseconds: arrival at the subscriber minus the granted `expires_at`.
struct Lateness {
    count: usize,
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Lateness {
    fn print(&self) {
        println!(
            "expiry: {} expiries seen; lateness ms: min {:.2}  p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
            self.count, self.min, self.p50, self.p90, self.p99, self.max
        );
    }
}

/// Joins grants with arrivals; every granted instance must have been seen to expire.
fn lateness(grants: &[Grant], arrivals: &HashMap<String, SystemTime>) -> anyhow::Result<Lateness> {
    let mut samples = Vec::with_capacity(grants.len());
    let mut missing = Vec::new();
    for grant in grants {
        let Some(&arrived) = arrivals.get(&grant.id) else {
            missing.push(grant.id.as_str());
            continue;
        };
        let expires_at = humantime::parse_rfc3339(&grant.lease.expires_at)
            .with_context(|| format!("bad expires_at {:?}", grant.lease.expires_at))?;
        samples.push(signed_ms(arrived, expires_at));
    }
    if !missing.is_empty() {
        bail!(
            "{} of {} expiries never arrived within {EXPIRY_DEADLINE:?} (first: {:?})",
            missing.len(),
            grants.len(),
            &missing[..missing.len().min(5)]
        );
    }
    ensure!(!samples.is_empty(), "no expiries to measure");
    samples.sort_by(f64::total_cmp);
    Ok(Lateness {
        count: samples.len(),
        min: samples[0],
        p50: percentile(&samples, 0.50),
        p90: percentile(&samples, 0.90),
        p99: percentile(&samples, 0.99),
        max: samples[samples.len() - 1],
    })
}

/// `a - b` in milliseconds, negative when `a` is earlier: `expires_at` is rounded to the
/// millisecond, so an on-time expiry can appear a fraction of a millisecond early.
fn signed_ms(a: SystemTime, b: SystemTime) -> f64 {
    match a.duration_since(b) {
        Ok(late) => late.as_secs_f64() * 1e3,
        Err(early) => -early.duration().as_secs_f64() * 1e3,
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The value of the daemon's metric `name` (a counter or gauge without labels).
async fn metric(client: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no metric {name}"))
}

/// Prints the daemon's own view of expiry lateness, for comparison with the client's.
async fn print_metric_lines(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let response = client.get(format!("{base}/metrics")).send().await?;
    ensure!(
        response.status() == reqwest::StatusCode::OK,
        "/metrics answered {}",
        response.status()
    );
    let text = response.text().await?;
    println!("daemon metric (reaper-side lateness, excludes event delivery):");
    for line in text
        .lines()
        .filter(|l| l.starts_with("harbor_lease_expiry_lateness_seconds"))
    {
        println!("  {line}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events

struct SseEvent {
    kind: String,
    data: String,
    /// When the chunk that completed this event was read.
    arrived: SystemTime,
}

/// A minimal SSE parser over a byte stream: `event:` and `data:` fields, events ended by a blank
/// line, comments (keep-alives) skipped.
struct SseReader<S> {
    body: S,
    buf: Vec<u8>,
    kind: String,
    data: Option<String>,
    ready: VecDeque<SseEvent>,
}

// Generic over the chunk type so that `bytes::Bytes` (what reqwest yields) need not be named.
impl<S, B> SseReader<S>
where
    S: Stream<Item = reqwest::Result<B>> + Unpin,
    B: AsRef<[u8]>,
{
    fn new(body: S) -> Self {
        Self {
            body,
            buf: Vec::new(),
            kind: String::new(),
            data: None,
            ready: VecDeque::new(),
        }
    }

    /// The next event, or `None` if the stream ended; an error if the deadline passes first.
    async fn next_event_within(&mut self, deadline: Instant) -> anyhow::Result<Option<SseEvent>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .context("no event before the deadline")?;
            let Some(chunk) = chunk else {
                return Ok(None);
            };
            let chunk = chunk.context("the event stream broke")?;
            self.feed(chunk.as_ref(), SystemTime::now());
        }
    }

    /// Appends a chunk and parses every complete line in the buffer.
    fn feed(&mut self, chunk: &[u8], arrived: SystemTime) {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(len) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&self.buf[start..start + len]).into_owned();
            start += len + 1;
            self.line(line.strip_suffix('\r').unwrap_or(&line), arrived);
        }
        self.buf.drain(..start);
    }

    fn line(&mut self, line: &str, arrived: SystemTime) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                self.ready.push_back(SseEvent {
                    kind: std::mem::take(&mut self.kind),
                    data,
                    arrived,
                });
            }
            self.kind.clear();
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => value.clone_into(&mut self.kind),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
}
