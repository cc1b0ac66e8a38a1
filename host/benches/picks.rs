//! Strategy pick benchmark: the cost of one pick through the full host path
//! (`harbor::plugins::Balancer::pick`: the ArcSwap loads, this thread's wasm instance, the guest
//! `pick` call) against the same strategy written natively in this file.
//!
//! Configurations: the built-in `round-robin` and `least-connections` strategies, routes of 4 and
//! 64 backends, and one or two threads picking on the same balancer at once (one route, many
//! connections: the realistic case, and the one where contention or queueing would show).
//!
//! Each thread warms up, then times batches of picks until a time budget runs out; the figures
//! are the median and p99 of the batch means. Run with `cargo bench -p harbor --bench picks`. It
//! is a benchmark, not a test: a missed target is reported, not a failure. A pick that falls back
//! to the host's own round-robin is a failure, because then the wasm path was not measured.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::Context;
use harbor::events::EventBus;
use harbor::metrics::Metrics;
use harbor::plugins::{BackendSpec, Balancer, PluginEngine, Reporter, Strategies};

const ROUTE_SIZES: [usize; 2] = [4, 64];
const THREAD_COUNTS: [usize; 2] = [1, 2];

/// Picks per thread before timing: they instantiate the thread's guest, build its balancer
/// resource, and warm caches and branch predictors.
const WARMUP_PICKS: usize = 10_000;
/// Picks per timed batch: long enough that reading the clock is noise, short enough that a batch
/// descheduled by other work on the machine is one outlier among thousands.
const BATCH: usize = 1_000;
/// Timing per thread and configuration; with the batch cap below, it bounds the run.
const BUDGET: Duration = Duration::from_secs(1);
const MAX_BATCHES: usize = 100_000;

/// The target from the issue.
const TARGET_NS: f64 = 150.0;
const TARGET: &str = "target: <= 150 ns median per wasm pick, no queueing with two threads";

/// Every pick is a request's first try: nothing excluded. Passed through `black_box` so the
/// native strategies cannot drop their exclusion handling.
const NO_EXCLUDE: &[u32] = &[];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    RoundRobin,
    LeastConnections,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::RoundRobin, Kind::LeastConnections];

    /// The built-in strategy's name, which is also its slot's name.
    fn name(self) -> &'static str {
        match self {
            Kind::RoundRobin => "round-robin",
            Kind::LeastConnections => "least-connections",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("compiling the built-in strategies (a few seconds)...");
    let strategies = strategies()?;
    let mut rows = Vec::new();
    for kind in Kind::ALL {
        for size in ROUTE_SIZES {
            rows.extend(measure_route(&strategies, kind, size)?);
        }
    }
    print_report(&rows, started.elapsed());
    Ok(())
}

/// The strategy catalog with its built-ins compiled, as the daemon sets it up.
fn strategies() -> anyhow::Result<Arc<Strategies>> {
    let engine = PluginEngine::shared()?;
    let bus = Arc::new(EventBus::new(1024));
    let metrics = Arc::new(Metrics::new()?);
    let reporter = Arc::new(Reporter::new(bus, metrics));
    Strategies::new(engine, None, reporter)
}

/// A route of `size` healthy backends of weight 1. The addresses are never dialled.
fn route(size: usize) -> Vec<BackendSpec> {
    (0..size)
        .map(|i| BackendSpec {
            address: format!("127.0.0.1:{}", 20_000 + i),
            weight: 1,
            healthy: true,
            labels: vec![],
        })
        .collect()
}

/// One line of the report: a strategy, a route size and a thread count, timed both ways.
struct Row {
    kind: Kind,
    size: usize,
    threads: usize,
    wasm: Timing,
    native: Timing,
}

/// Measures one strategy on one route size with each thread count. The same balancer serves
/// every thread count, as one route serves all of a daemon's connections.
fn measure_route(strategies: &Strategies, kind: Kind, size: usize) -> anyhow::Result<Vec<Row>> {
    let slot = strategies
        .slot(kind.name())
        .with_context(|| format!("no built-in strategy named {}", kind.name()))?;
    let backends = route(size);
    let wasm = Wasm(Balancer::new(slot, backends.clone()));
    let native = NativeRoute::new(&backends);
    let rows = THREAD_COUNTS
        .iter()
        .map(|&threads| {
            eprintln!(
                "measuring {} / {size} backends / {threads} thread(s)",
                kind.name()
            );
            let wasm = measure(&wasm, threads);
            let native = match kind {
                Kind::RoundRobin => measure(&NativeRoundRobin(&native), threads),
                Kind::LeastConnections => measure(&NativeLeastConnections(&native), threads),
            };
            Row {
                kind,
                size,
                threads,
                wasm,
                native,
            }
        })
        .collect();
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// The two ways to pick

/// One way of choosing a backend, shared by every picking thread.
trait Picker: Sync {
    fn pick(&self, exclude: &[u32]) -> usize;
}

/// The full host path: what a connection on a worker thread calls.
struct Wasm(Balancer);

impl Picker for Wasm {
    fn pick(&self, exclude: &[u32]) -> usize {
        let picked = self.0.pick(None, exclude).expect("the route has backends");
        assert!(
            !picked.fallback,
            "the host's fallback picked, so the wasm path was not measured"
        );
        picked.index
    }
}

/// What a native strategy keeps between backend changes, as the guests do: the indexes a pick
/// may choose from (the healthy ones, or all when none is healthy), the route's pick counter
/// shared by all threads, and the live in-flight counts the host would keep.
struct NativeRoute {
    usable: Vec<u32>,
    weights: Vec<u64>,
    in_flight: Vec<AtomicU32>,
    sequence: AtomicU64,
}

impl NativeRoute {
    fn new(backends: &[BackendSpec]) -> Self {
        let indexes = 0..backends.len() as u32;
        let healthy: Vec<u32> = indexes
            .clone()
            .filter(|&i| backends[i as usize].healthy)
            .collect();
        Self {
            usable: if healthy.is_empty() {
                indexes.collect()
            } else {
                healthy
            },
            weights: backends
                .iter()
                .map(|b| u64::from(b.weight.max(1)))
                .collect(),
            in_flight: backends.iter().map(|_| AtomicU32::new(0)).collect(),
            sequence: AtomicU64::new(0),
        }
    }

    /// The usable, non-excluded candidates in index order, and how many there are.
    fn candidates<'a>(
        &'a self,
        exclude: &'a [u32],
    ) -> (impl Iterator<Item = u32> + Clone + 'a, usize) {
        let candidates = self
            .usable
            .iter()
            .copied()
            .filter(move |i| !exclude.contains(i));
        // A first try excludes nothing, so its count is known without a scan.
        let len = if exclude.is_empty() {
            self.usable.len()
        } else {
            candidates.clone().count()
        };
        (candidates, len)
    }
}

/// Round-robin by the shared pick counter, as the guest does it.
struct NativeRoundRobin<'a>(&'a NativeRoute);

impl Picker for NativeRoundRobin<'_> {
    fn pick(&self, exclude: &[u32]) -> usize {
        let route = self.0;
        let sequence = route.sequence.fetch_add(1, Ordering::Relaxed);
        let (mut candidates, len) = route.candidates(exclude);
        let turn = (sequence % len as u64) as usize;
        // A first try indexes the usable list directly, as the guest's precomputed list does.
        let index = if exclude.is_empty() {
            Some(route.usable[turn])
        } else {
            candidates.nth(turn)
        };
        index.expect("a candidate") as usize
    }
}

/// The fewest in-flight per unit of weight, scanning from `sequence % len` so ties take turns, as
/// the guest does it.
struct NativeLeastConnections<'a>(&'a NativeRoute);

impl Picker for NativeLeastConnections<'_> {
    fn pick(&self, exclude: &[u32]) -> usize {
        let route = self.0;
        let sequence = route.sequence.fetch_add(1, Ordering::Relaxed);
        let (candidates, len) = route.candidates(exclude);
        let start = (sequence % len as u64) as usize;
        let rotated = candidates.clone().skip(start).chain(candidates.take(start));
        // (index, in flight, weight). u64 products cannot overflow: a u32 count times a weight
        // of at most 10,000.
        let mut best: Option<(u32, u64, u64)> = None;
        for i in rotated {
            let in_flight = u64::from(route.in_flight[i as usize].load(Ordering::Relaxed));
            let weight = route.weights[i as usize];
            if best.is_none_or(|(_, b_flight, b_weight)| in_flight * b_weight < b_flight * weight) {
                best = Some((i, in_flight, weight));
            }
        }
        best.expect("a candidate").0 as usize
    }
}

// ---------------------------------------------------------------------------------------------
// Timing

/// Batch means and their summary, over all threads of one configuration.
struct Timing {
    pooled: Summary,
    /// Each thread's median, in thread order.
    per_thread: Vec<f64>,
}

#[derive(Clone, Copy)]
struct Summary {
    median: f64,
    p99: f64,
}

/// Runs `threads` threads picking on `picker` at once; each starts timing only when all have
/// warmed up, so their timed batches overlap.
fn measure<P: Picker>(picker: &P, threads: usize) -> Timing {
    let barrier = Barrier::new(threads);
    let mut per_thread: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| time_batches(picker, &barrier)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let medians = per_thread.iter_mut().map(|m| summarize(m).median).collect();
    let mut pooled: Vec<f64> = per_thread.concat();
    Timing {
        pooled: summarize(&mut pooled),
        per_thread: medians,
    }
}

/// One thread's part: warm up, wait for the others, then batch means (ns per pick) until the
/// budget runs out.
fn time_batches<P: Picker>(picker: &P, barrier: &Barrier) -> Vec<f64> {
    for _ in 0..WARMUP_PICKS {
        black_box(picker.pick(black_box(NO_EXCLUDE)));
    }
    barrier.wait();
    let until = Instant::now() + BUDGET;
    let mut means = Vec::with_capacity(MAX_BATCHES);
    while means.len() < MAX_BATCHES {
        let start = Instant::now();
        for _ in 0..BATCH {
            black_box(picker.pick(black_box(NO_EXCLUDE)));
        }
        let end = Instant::now();
        means.push((end - start).as_nanos() as f64 / BATCH as f64);
        if end >= until {
            break;
        }
    }
    means
}

/// Sorts `values` and takes the median and the p99 (nearest rank).
fn summarize(values: &mut [f64]) -> Summary {
    values.sort_by(f64::total_cmp);
    let rank = |q: f64| {
        let i = (q * values.len() as f64).ceil() as usize;
        values[i.clamp(1, values.len()) - 1]
    };
    Summary {
        median: rank(0.5),
        p99: rank(0.99),
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn print_report(rows: &[Row], elapsed: Duration) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!();
    println!("Balancer::pick (wasm guest) vs the same strategy in native Rust, ns per pick");
    println!(
        "machine: {cores} cores, shared with other work (load average now: {}); \
         figures are medians (and p99s) of {BATCH}-pick batch means, ~{}s per thread and configuration",
        load.join(" "),
        BUDGET.as_secs()
    );
    println!(
        "2-thread rows pool both threads' batches; per-thread medians are listed on the right"
    );
    println!();
    print_picks(rows);
    println!();
    print_queueing(rows);
    println!();
    print_verdict(rows);
    println!("finished in {:.1}s", elapsed.as_secs_f64());
}

fn print_picks(rows: &[Row]) {
    println!(
        "{:<18} {:>8} {:>7} | {:>11} {:>8} | {:>13} {:>8} | {:>11} | per-thread medians wasm ; native",
        "strategy",
        "backends",
        "threads",
        "wasm median",
        "p99",
        "native median",
        "p99",
        "wasm/native"
    );
    for row in rows {
        let per_thread = if row.threads > 1 {
            format!(
                "{} ; {}",
                join(&row.wasm.per_thread),
                join(&row.native.per_thread)
            )
        } else {
            String::new()
        };
        println!(
            "{:<18} {:>8} {:>7} | {:>11.1} {:>8.1} | {:>13.1} {:>8.1} | {:>10.1}x | {per_thread}",
            row.kind.name(),
            row.size,
            row.threads,
            row.wasm.pooled.median,
            row.wasm.pooled.p99,
            row.native.pooled.median,
            row.native.pooled.p99,
            row.wasm.pooled.median / row.native.pooled.median,
        );
    }
}

/// Two threads against one: a ratio near 1 means picks do not wait on each other.
fn print_queueing(rows: &[Row]) {
    println!("queueing: 2-thread median / 1-thread median (near 1.0 = picks do not queue)");
    println!(
        "{:<18} {:>8} | {:>8} {:>8} {:>6} | {:>9} {:>9} {:>6}",
        "strategy", "backends", "wasm 1T", "wasm 2T", "ratio", "native 1T", "native 2T", "ratio"
    );
    for (one, two) in pairs(rows) {
        let (w1, w2) = (one.wasm.pooled.median, two.wasm.pooled.median);
        let (n1, n2) = (one.native.pooled.median, two.native.pooled.median);
        println!(
            "{:<18} {:>8} | {w1:>8.1} {w2:>8.1} {:>6.2} | {n1:>9.1} {n2:>9.1} {:>6.2}",
            one.kind.name(),
            one.size,
            w2 / w1,
            n2 / n1
        );
    }
}

fn print_verdict(rows: &[Row]) {
    println!("{TARGET}");
    let within = rows
        .iter()
        .filter(|r| r.wasm.pooled.median <= TARGET_NS)
        .count();
    println!(
        "  wasm medians within {TARGET_NS} ns: {within} of {} configurations",
        rows.len()
    );
    for row in rows.iter().filter(|r| r.wasm.pooled.median > TARGET_NS) {
        println!(
            "  over: {} / {} backends / {} thread(s): {:.1} ns",
            row.kind.name(),
            row.size,
            row.threads,
            row.wasm.pooled.median
        );
    }
    if let Some((one, two)) = pairs(rows).max_by(|a, b| queueing(a).total_cmp(&queueing(b))) {
        println!(
            "  worst wasm 2T/1T ratio: {:.2} ({} / {} backends)",
            queueing(&(one, two)),
            one.kind.name(),
            one.size
        );
    }
}

/// The 1-thread and 2-thread rows of each strategy and route size.
fn pairs(rows: &[Row]) -> impl Iterator<Item = (&Row, &Row)> {
    rows.iter().filter(|r| r.threads == 1).filter_map(|one| {
        rows.iter()
            .find(|r| r.threads == 2 && r.size == one.size && r.kind == one.kind)
            .map(|two| (one, two))
    })
}

fn queueing((one, two): &(&Row, &Row)) -> f64 {
    two.wasm.pooled.median / one.wasm.pooled.median
}

fn join(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.1}"))
        .collect::<Vec<_>>()
        .join(" / ")
}
