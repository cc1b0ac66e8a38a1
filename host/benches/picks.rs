//! Strategy pick benchmark: the cost of one pick through the full host path
//! (`harbor::plugins::Balancer::pick`: the ArcSwap loads, this thread's wasm instance and the
//! pick plan the strategy handed it, or the guest call) against the same strategy written
//! natively in this file.
//!
//! Configurations: the built-in `round-robin` and `least-connections` strategies (a table and a
//! least-loaded rule), least-connections again with every pick a retry (`lc, guest call`: the
//! host calls the guest for retries and for strategies without a plan), routes of 4 and 64
//! backends, and one or two threads picking on the same balancer at once (one route, many
//! connections: the realistic case, and the one where contention or queueing would show).
//!
//! Each thread warms up, then times batches of picks until its time slice runs out; the figures
//! are the median and p99 of the batch means. The configurations take turns over several rounds,
//! so a noisy spell on the shared machine lands on all of them alike. Each thread also reads how
//! long it sat runnable but off the CPU (`/proc/thread-self/schedstat`), so a slow configuration
//! on a busy machine can be told apart from picks that wait on each other.
//!
//! Run with `cargo bench -p harbor --bench picks`; `-- least-connections` (any part of a strategy
//! name or row label) runs only the matching configurations, e.g. under `perf`. It is a benchmark, not a test: a
//! missed target is reported, not a failure. A pick that falls back to the host's own round-robin
//! is a failure, because then the wasm path was not measured.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::Context;
use harbor::events::EventBus;
use harbor::metrics::Metrics;
use harbor::plugins::{BackendSpec, Balancer, PluginEngine, Reporter, Shadow, Strategies};

#[path = "support/machine.rs"]
mod machine;
use machine::MachineTicks;

const ROUTE_SIZES: [usize; 2] = [4, 64];
const THREAD_COUNTS: [usize; 2] = [1, 2];

/// Picks per thread before timing: they instantiate the thread's guest, build its balancer
/// resource, and warm caches and branch predictors.
const WARMUP_PICKS: usize = 10_000;
/// Picks per timed batch: long enough that reading the clock is noise, short enough that a batch
/// descheduled by other work on the machine is one outlier among thousands.
const BATCH: usize = 1_000;
/// Rounds over all configurations, and timing per thread, configuration and round: 1 s per
/// configuration in all. With the batch cap below, they bound the run.
const ROUNDS: u32 = 10;
const SLICE: Duration = Duration::from_millis(100);
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
    /// Least connections through a guest call on every pick: what a retry costs, and every pick
    /// of a strategy that hands the host no plan. Not held to the target.
    GuestCall,
    /// Round-robin with least-connections as its shadow: what a shadow adds to a pick. Its
    /// native peer is round-robin alone. Not held to the target.
    Shadowed,
}

/// An exclusion that names no backend: it makes every pick a retry, which the host always
/// hands to the guest, without changing what may be picked.
const NOTHING_REAL: &[u32] = &[u32::MAX];

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::RoundRobin,
        Kind::LeastConnections,
        Kind::GuestCall,
        Kind::Shadowed,
    ];

    /// The built-in strategy's name, which is also its slot's name.
    fn name(self) -> &'static str {
        match self {
            Kind::RoundRobin | Kind::Shadowed => "round-robin",
            Kind::LeastConnections | Kind::GuestCall => "least-connections",
        }
    }

    /// How the report names the configuration.
    fn label(self) -> &'static str {
        match self {
            Kind::GuestCall => "lc, guest call",
            Kind::Shadowed => "rr, lc shadow",
            other => other.name(),
        }
    }

    fn exclude(self) -> &'static [u32] {
        match self {
            Kind::GuestCall => NOTHING_REAL,
            _ => NO_EXCLUDE,
        }
    }

    fn held_to_target(self) -> bool {
        !matches!(self, Kind::GuestCall | Kind::Shadowed)
    }
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("compiling the built-in strategies (a few seconds)...");
    let (strategies, metrics) = strategies()?;
    let mut routes = Vec::new();
    for kind in selected_kinds() {
        for size in ROUTE_SIZES {
            routes.push(Route::new(&strategies, &metrics, kind, size)?);
        }
    }
    let mut configs: Vec<Config> = routes
        .iter()
        .flat_map(|route| THREAD_COUNTS.map(|threads| Config::new(route, threads)))
        .collect();
    let cpu_before = CpuUse::now();
    for round in 1..=ROUNDS {
        eprintln!(
            "round {round} of {ROUNDS}: {} configurations",
            configs.len()
        );
        for config in &mut configs {
            config.run();
        }
    }
    let others = cpu_before
        .zip(CpuUse::now())
        .map(|(b, a)| a.others_since(&b));
    let rows: Vec<Row> = configs.into_iter().map(Config::finish).collect();
    print_report(&rows, others, started.elapsed());
    Ok(())
}

/// The strategies named on the command line (any part of a name), or all. Cargo passes
/// `--bench` to a benchmark without the standard harness; flags are not names.
fn selected_kinds() -> Vec<Kind> {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    Kind::ALL
        .into_iter()
        .filter(|k| {
            filters.is_empty()
                || filters
                    .iter()
                    .any(|f| k.name().contains(f.as_str()) || k.label().contains(f.as_str()))
        })
        .collect()
}

/// The strategy catalog with its built-ins compiled, as the daemon sets it up.
fn strategies() -> anyhow::Result<(Arc<Strategies>, Arc<Metrics>)> {
    let engine = PluginEngine::shared()?;
    let bus = Arc::new(EventBus::new(1024));
    let metrics = Arc::new(Metrics::new()?);
    let reporter = Arc::new(Reporter::new(bus, metrics.clone()));
    Ok((Strategies::new(engine, None, reporter)?, metrics))
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

/// One strategy on one route, both ways. The same balancer serves every thread count, as one
/// route serves all of a daemon's connections.
struct Route {
    kind: Kind,
    size: usize,
    wasm: Wasm,
    native: NativeRoute,
    /// The connections each backend has in flight, held for the whole run.
    _held: Vec<harbor::plugins::InFlight>,
}

/// Connections in flight on backend `i` during the run: at least one everywhere, so that a
/// least-connections scan cannot stop early at an idle backend and reads every count, as it
/// must on a busy route; the least loaded backend sits at the end of the list.
fn busy(i: usize, size: usize) -> u32 {
    if i + 1 == size {
        1
    } else {
        2 + (i * 7 % 5) as u32
    }
}

impl Route {
    fn new(
        strategies: &Strategies,
        metrics: &Metrics,
        kind: Kind,
        size: usize,
    ) -> anyhow::Result<Self> {
        let slot = strategies
            .slot(kind.name())
            .with_context(|| format!("no built-in strategy named {}", kind.name()))?;
        let backends = route(size);
        let wasm = Balancer::new(slot, backends.clone());
        if kind == Kind::Shadowed {
            let shadow = strategies
                .slot("least-connections")
                .context("no built-in least-connections")?;
            wasm.set_shadow(Some(Arc::new(Shadow::new(
                shadow,
                "bench",
                metrics.shadow.clone(),
            ))));
        }
        let native = NativeRoute::new(&backends);
        let loads = wasm.backends().loads.clone();
        let mut held = Vec::new();
        for i in 0..size {
            let load = loads.get(i).context("a backend's load")?;
            for _ in 0..busy(i, size) {
                held.push(load.start());
                native.in_flight[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Self {
            kind,
            size,
            wasm: Wasm(wasm),
            native,
            _held: held,
        })
    }

    fn measure_native(&self, threads: usize) -> Vec<ThreadRun> {
        let exclude = self.kind.exclude();
        match self.kind {
            Kind::RoundRobin | Kind::Shadowed => {
                measure(&NativeRoundRobin(&self.native), threads, exclude)
            }
            Kind::LeastConnections | Kind::GuestCall => {
                measure(&NativeLeastConnections(&self.native), threads, exclude)
            }
        }
    }
}

/// A route picked on by some number of threads, with the timings gathered so far.
struct Config<'a> {
    route: &'a Route,
    threads: usize,
    wasm: Samples,
    native: Samples,
}

impl<'a> Config<'a> {
    fn new(route: &'a Route, threads: usize) -> Self {
        Self {
            route,
            threads,
            wasm: Samples::default(),
            native: Samples::default(),
        }
    }

    /// One round: a slice of wasm picks, then a slice of native ones.
    fn run(&mut self) {
        let exclude = self.route.kind.exclude();
        self.wasm
            .add(measure(&self.route.wasm, self.threads, exclude));
        self.native.add(self.route.measure_native(self.threads));
    }

    fn finish(self) -> Row {
        Row {
            kind: self.route.kind,
            size: self.route.size,
            threads: self.threads,
            wasm: self.wasm.timing(),
            native: self.native.timing(),
        }
    }
}

/// One line of the report: a strategy, a route size and a thread count, timed both ways.
struct Row {
    kind: Kind,
    size: usize,
    threads: usize,
    wasm: Timing,
    native: Timing,
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
/// the guest does it. A first try scans the usable list in two plain runs, as the host's
/// `least-loaded` plan does; a retry filters out its exclusions on the way.
struct NativeLeastConnections<'a>(&'a NativeRoute);

impl Picker for NativeLeastConnections<'_> {
    fn pick(&self, exclude: &[u32]) -> usize {
        let route = self.0;
        let sequence = route.sequence.fetch_add(1, Ordering::Relaxed);
        let (candidates, len) = route.candidates(exclude);
        let start = (sequence % len as u64) as usize;
        // (index, in flight, weight). u64 products cannot overflow: a u32 count times a weight
        // of at most 10,000.
        let mut best: Option<(u32, u64, u64)> = None;
        let mut consider = |i: u32| {
            let in_flight = u64::from(route.in_flight[i as usize].load(Ordering::Relaxed));
            let weight = route.weights[i as usize];
            if best.is_none_or(|(_, b_flight, b_weight)| in_flight * b_weight < b_flight * weight) {
                best = Some((i, in_flight, weight));
            }
        };
        if exclude.is_empty() {
            let (before, from) = route.usable.split_at(start);
            from.iter().chain(before).for_each(|&i| consider(i));
        } else {
            let rotated = candidates.clone().skip(start).chain(candidates.take(start));
            rotated.for_each(consider);
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
    /// Share of the timed wall-clock time the threads spent runnable but not running, when the
    /// kernel reports it: CPU stolen by other work, not time spent picking.
    runq_share: Option<f64>,
}

/// One thread's timed window.
struct ThreadRun {
    /// ns per pick of each batch.
    means: Vec<f64>,
    wall: Duration,
    /// Time runnable but off the CPU during the window.
    waited: Option<Duration>,
}

#[derive(Clone, Copy)]
struct Summary {
    median: f64,
    p99: f64,
}

/// Runs `threads` threads picking on `picker` at once for one slice; each starts timing only
/// when all have warmed up, so their timed batches overlap.
fn measure<P: Picker>(picker: &P, threads: usize, exclude: &[u32]) -> Vec<ThreadRun> {
    let barrier = Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| time_batches(picker, &barrier, exclude)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// The slices of one configuration and way of picking, per thread (the nth thread of every
/// round counts as the same thread).
#[derive(Default)]
struct Samples {
    threads: Vec<ThreadRun>,
}

impl Samples {
    fn add(&mut self, runs: Vec<ThreadRun>) {
        for (i, run) in runs.into_iter().enumerate() {
            match self.threads.get_mut(i) {
                Some(so_far) => so_far.append(run),
                None => self.threads.push(run),
            }
        }
    }

    fn timing(mut self) -> Timing {
        let per_thread = self
            .threads
            .iter_mut()
            .map(|t| summarize(&mut t.means).median)
            .collect();
        let waited: Option<Duration> = self.threads.iter().map(|t| t.waited).sum();
        let wall: Duration = self.threads.iter().map(|t| t.wall).sum();
        let mut pooled: Vec<f64> = self.threads.into_iter().flat_map(|t| t.means).collect();
        Timing {
            pooled: summarize(&mut pooled),
            per_thread,
            runq_share: waited.map(|w| w.as_secs_f64() / wall.as_secs_f64()),
        }
    }
}

impl ThreadRun {
    fn append(&mut self, other: ThreadRun) {
        self.means.extend(other.means);
        self.wall += other.wall;
        self.waited = self.waited.zip(other.waited).map(|(a, b)| a + b);
    }
}

/// One thread's part: warm up, wait for the others, then batch means (ns per pick) until the
/// slice runs out.
fn time_batches<P: Picker>(picker: &P, barrier: &Barrier, exclude: &[u32]) -> ThreadRun {
    for _ in 0..WARMUP_PICKS {
        black_box(picker.pick(black_box(exclude)));
    }
    barrier.wait();
    let waited_before = runqueue_wait();
    let started = Instant::now();
    let until = started + SLICE;
    let mut means = Vec::with_capacity(MAX_BATCHES);
    while means.len() < MAX_BATCHES {
        let start = Instant::now();
        for _ in 0..BATCH {
            black_box(picker.pick(black_box(exclude)));
        }
        let end = Instant::now();
        means.push((end - start).as_nanos() as f64 / BATCH as f64);
        if end >= until {
            break;
        }
    }
    ThreadRun {
        means,
        wall: started.elapsed(),
        waited: runqueue_wait()
            .zip(waited_before)
            .map(|(after, before)| after.saturating_sub(before)),
    }
}

/// How long this thread has been runnable but waiting for a CPU, from the second field of
/// `/proc/thread-self/schedstat` (absent without schedstats or outside Linux).
fn runqueue_wait() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// CPU time used so far, in clock ticks: by the whole machine (steal included: a vCPU the
/// hypervisor gave to someone else) and by this process. The difference over the rounds is the
/// other work that competed with the picks, which on this shared machine moves the medians.
struct CpuUse {
    machine: MachineTicks,
    ours: u64,
}

impl CpuUse {
    fn now() -> Option<Self> {
        let machine = MachineTicks::now()?;
        // /proc/self/stat: utime and stime are the 12th and 13th fields after the command name.
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        let fields: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
        let ours = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(Self { machine, ours })
    }

    /// Cores' worth of CPU that others used since `before`.
    fn others_since(&self, before: &CpuUse) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total = self
            .machine
            .total
            .saturating_sub(before.machine.total)
            .max(1) as f64;
        let busy = self.machine.busy().saturating_sub(before.machine.busy());
        let ours = self.ours.saturating_sub(before.ours);
        busy.saturating_sub(ours) as f64 / total * cores
    }
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

fn print_report(rows: &[Row], others: Option<f64>, elapsed: Duration) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!();
    println!("Balancer::pick (wasm guest) vs the same strategy in native Rust, ns per pick");
    let others = others.map_or_else(|| "unknown".to_owned(), |c| format!("{c:.2}"));
    println!(
        "machine: {cores} cores, shared with other work: it used {others} cores on average \
         during the rounds (load average now: {})",
        load.join(" ")
    );
    println!(
        "figures are medians (and p99s) of {BATCH}-pick batch means over {ROUNDS} rounds of \
         {} ms per thread and configuration; 2-thread rows pool both threads' batches",
        SLICE.as_millis()
    );
    println!(
        "runq = share of the timed window the picking threads sat runnable but off the CPU \
         (other work on the machine)"
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
        "{:<18} {:>8} {:>7} | {:^24} | {:^24} | {:>11} | per-thread medians",
        "", "", "", "wasm", "native", ""
    );
    println!(
        "{:<18} {:>8} {:>7} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>11} | wasm ; native",
        "strategy",
        "backends",
        "threads",
        "median",
        "p99",
        "runq",
        "median",
        "p99",
        "runq",
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
            "{:<18} {:>8} {:>7} | {} | {} | {:>10.1}x | {per_thread}",
            row.kind.label(),
            row.size,
            row.threads,
            cells(&row.wasm),
            cells(&row.native),
            row.wasm.pooled.median / row.native.pooled.median,
        );
    }
}

/// Median, p99 and run-queue share, aligned under the headers.
fn cells(t: &Timing) -> String {
    format!(
        "{:>8.1} {:>8.1} {:>6}",
        t.pooled.median,
        t.pooled.p99,
        percent(t.runq_share)
    )
}

fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| "n/a".to_owned(), |s| format!("{:.0}%", s * 100.0))
}

/// Two threads against one: a ratio near 1 means picks do not wait on each other. A high
/// run-queue share in the 2-thread row means the machine, not the balancer, held them back.
fn print_queueing(rows: &[Row]) {
    println!("queueing: 2-thread median / 1-thread median (near 1.0 = picks do not queue)");
    println!(
        "{:<18} {:>8} | {:>8} {:>8} {:>6} {:>8} | {:>9} {:>9} {:>6}",
        "strategy",
        "backends",
        "wasm 1T",
        "wasm 2T",
        "ratio",
        "2T runq",
        "native 1T",
        "native 2T",
        "ratio"
    );
    for (one, two) in pairs(rows) {
        let (w1, w2) = (one.wasm.pooled.median, two.wasm.pooled.median);
        let (n1, n2) = (one.native.pooled.median, two.native.pooled.median);
        println!(
            "{:<18} {:>8} | {w1:>8.1} {w2:>8.1} {:>6.2} {:>8} | {n1:>9.1} {n2:>9.1} {:>6.2}",
            one.kind.label(),
            one.size,
            queueing(one, two),
            percent(two.wasm.runq_share),
            n2 / n1
        );
    }
}

fn print_verdict(rows: &[Row]) {
    println!("{TARGET}");
    let (held, guest_calls): (Vec<&Row>, Vec<&Row>) =
        rows.iter().partition(|r| r.kind.held_to_target());
    let within = held
        .iter()
        .filter(|r| r.wasm.pooled.median <= TARGET_NS)
        .count();
    println!(
        "  wasm medians within {TARGET_NS} ns: {within} of {} configurations",
        held.len()
    );
    for row in held.iter().filter(|r| r.wasm.pooled.median > TARGET_NS) {
        println!(
            "  over: {} / {} backends / {} thread(s): {:.1} ns",
            row.kind.label(),
            row.size,
            row.threads,
            row.wasm.pooled.median
        );
    }
    if !guest_calls.is_empty() {
        let medians: Vec<String> = guest_calls
            .iter()
            .map(|r| format!("{:.0}", r.wasm.pooled.median))
            .collect();
        println!(
            "  a guest call per pick (retries; strategies without a plan): {} ns",
            medians.join(" / ")
        );
    }
    let worst =
        pairs(rows).max_by(|(a1, a2), (b1, b2)| queueing(a1, a2).total_cmp(&queueing(b1, b2)));
    if let Some((one, two)) = worst {
        println!(
            "  worst wasm 2T/1T ratio: {:.2} ({} / {} backends)",
            queueing(one, two),
            one.kind.label(),
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

fn queueing(one: &Row, two: &Row) -> f64 {
    two.wasm.pooled.median / one.wasm.pooled.median
}

fn join(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.1}"))
        .collect::<Vec<_>>()
        .join(" / ")
}
