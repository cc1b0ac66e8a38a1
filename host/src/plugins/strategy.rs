//! One loaded strategy component: compiled, checked before it may serve (the admission check),
//! and guarded by a breaker that takes it out of service, with backoff, when it keeps failing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use wasmtime::Store;
use wasmtime::component::Linker;

use super::engine::{PluginEngine, content_hash, ticks};
use super::guest::{self, Backend, Description, GuestState, PluginPre};
use super::limits::{Limit, Limits, Setup};
use super::load::LoadTable;
use super::report::{FaultKind, Reporter};
use crate::backoff::Backoff;
use crate::model::{StrategyName, StrategySettings};

/// Deadline of set-up work (instantiation, describe, configure, building a balancer, which may
/// fill a large table), in epoch ticks. It is off the request path but for the first pick after
/// a backend change.
pub const SETUP_DEADLINE_TICKS: u64 = ticks(Duration::from_secs(1));
/// Settings verdicts a strategy version remembers; a service's settings change seldom.
const MAX_VERDICTS: usize = 256;
/// Picks in a window before the budget is judged.
const BUDGET_SAMPLE: u32 = 100;

/// Faults within one breaker window that take a plugin out of service.
const FAULTS_TO_TRIP: u32 = 5;
/// How long a tripped breaker keeps a plugin out: 1 s, doubling with each trip, up to a minute.
const OUT_OF_SERVICE: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// Where a plugin came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Builtin,
    File(String),
    Api,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Builtin => f.write_str("builtin"),
            Source::File(path) => write!(f, "file:{path}"),
            Source::Api => f.write_str("api"),
        }
    }
}

/// Why a component may not serve.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

pub struct Loaded {
    /// Unique per load, so per-thread instances of an older version are never reused.
    pub generation: u64,
    pub name: StrategyName,
    pub description: Description,
    pub hash: String,
    pub source: Source,
    pub loaded_at: SystemTime,
    pub(super) engine: Arc<PluginEngine>,
    pub(super) pre: PluginPre<GuestState>,
    /// Its plugin-wide settings, which its `configure` was given.
    pub settings: StrategySettings,
    pub limits: Limits,
    /// The pick deadline in epoch ticks.
    pub(super) pick_ticks: u64,
    pub(super) reporter: Arc<Reporter>,
    breaker: Breaker,
    /// The instance route settings are checked on, made on first use and kept: checks come
    /// with registrations, and making an instance can cost a component milliseconds.
    checker: std::sync::Mutex<Option<(Store<GuestState>, guest::Plugin)>>,
    /// The verdicts of recent checks, by settings text: every instance of a service registers
    /// with the same settings, and renews by registering again.
    verdicts: std::sync::Mutex<std::collections::HashMap<String, Result<(), String>>>,
    /// Guest picks in the current window, and how many were over the budget.
    picks: PickWindow,
    pick_times: prometheus::Histogram,
}

#[derive(Default)]
struct PickWindow {
    start_ms: AtomicU64,
    count: AtomicU32,
    over: AtomicU32,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

impl Drop for Loaded {
    fn drop(&mut self) {
        // Picking threads may hold instances of this version that nothing will ask for again.
        super::shard::released();
    }
}

impl Loaded {
    /// Compiles `bytes` and checks that the component can serve: it instantiates, implements
    /// this contract version, describes itself with a valid name, accepts the default
    /// configuration, and answers a sample of picks correctly within its deadline, all within
    /// `limits`.
    pub fn admit(
        engine: &Arc<PluginEngine>,
        cache_dir: Option<&std::path::Path>,
        base: &Linker<GuestState>,
        bytes: &[u8],
        (source, Setup { limits, settings }): (Source, Setup),
        reporter: Arc<Reporter>,
    ) -> Result<Self, Rejected> {
        super::shape::check(bytes).map_err(Rejected)?;
        let component = engine.compile(bytes, cache_dir).map_err(|e| {
            Rejected(format!(
                "not a WebAssembly component Harbor can load: {}",
                one_line(&e)
            ))
        })?;
        let pre = guest::prepare(base, engine.engine(), &component)
            .map_err(|e| Rejected(format!("{e:#}")))?;
        let mut store = new_store(engine, &limits);
        let over_limits = |why: String| over_limits(why, &limits, &source);
        let plugin = call(&mut store, SETUP_DEADLINE_TICKS, |s| pre.instantiate(s))
            .map_err(|e| Rejected(format!("instantiating failed: {}", over_limits(e))))?;
        let api = plugin.harbor_strategy_strategy();
        let description = call(&mut store, SETUP_DEADLINE_TICKS, |s| api.call_describe(s))
            .map_err(|e| Rejected(format!("describe failed: {}", over_limits(e))))?;
        let name = StrategyName::parse(&description.name)
            .map_err(|e| Rejected(format!("describe returned an unusable name: {}", e.reason)))?;
        let config = settings.text().to_owned();
        call(&mut store, SETUP_DEADLINE_TICKS, |s| {
            api.call_configure(s, &config)
        })
        .map_err(|e| Rejected(format!("configure failed: {}", over_limits(e))))?
        .map_err(|reason| Rejected(format!("refuses its settings {config}: {reason}")))?;
        sample_picks(&mut store, &plugin, description.wants_outcomes)
            .map_err(|Rejected(why)| Rejected(over_limits(why)))?;
        let pick_times = reporter.pick_times(&name);
        Ok(Self {
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            name,
            description,
            hash: content_hash(bytes),
            source,
            loaded_at: SystemTime::now(),
            engine: engine.clone(),
            pre,
            settings,
            limits,
            pick_ticks: ticks(limits.pick_deadline),
            pick_times,
            reporter,
            breaker: Breaker::default(),
            checker: std::sync::Mutex::new(None),
            verdicts: std::sync::Mutex::default(),
            picks: PickWindow::default(),
        })
    }

    /// Asks the strategy whether it accepts `settings` for a route: its `configure-route` on an
    /// instance of the check's own, which then forgets the route. Runs guest code for up to the
    /// setup deadline: call it off the async runtime's threads. `Err` is the strategy's own
    /// reason, or what went wrong asking.
    pub fn check_settings(&self, settings: &str) -> Result<(), String> {
        if let Some(verdict) = crate::events::lock(&self.verdicts).get(settings) {
            return verdict.clone();
        }
        // A check that failed (a trap, a timeout) is not the strategy's verdict: not kept.
        let verdict = self
            .ask_settings(settings)
            .map_err(|failure| format!("checking them failed: {failure}"))?;
        let mut verdicts = crate::events::lock(&self.verdicts);
        if verdicts.len() >= MAX_VERDICTS {
            verdicts.clear();
        }
        verdicts.insert(settings.to_owned(), verdict.clone());
        verdict
    }

    /// The strategy's verdict on `settings`, or why it could not be asked.
    fn ask_settings(&self, settings: &str) -> Result<Result<(), String>, String> {
        const ROUTE: u32 = 0;
        let mut checker = crate::events::lock(&self.checker);
        if checker.is_none() {
            let mut store = new_store(&self.engine, &self.limits);
            let plugin = call(&mut store, SETUP_DEADLINE_TICKS, |s| {
                self.pre.instantiate(s)
            })?;
            call(&mut store, SETUP_DEADLINE_TICKS, |s| {
                plugin
                    .harbor_strategy_strategy()
                    .call_configure(s, self.settings.text())
            })?
            .map_err(|reason| format!("it refuses its plugin-wide settings: {reason}"))?;
            *checker = Some((store, plugin));
        }
        let Some((store, plugin)) = checker.as_mut() else {
            return Err("no instance to check settings on".to_owned());
        };
        let api = plugin.harbor_strategy_strategy();
        let answer = call(store, SETUP_DEADLINE_TICKS, |s| {
            api.call_configure_route(s, ROUTE, settings)
        })
        .and_then(|answer| {
            call(store, SETUP_DEADLINE_TICKS, |s| api.call_forget(s, ROUTE))?;
            Ok(answer)
        });
        if answer.is_err() {
            // A trap leaves the instance unusable: the next check makes another.
            *checker = None;
        }
        answer
    }

    /// Whether the breaker lets calls through now.
    pub fn in_service(&self) -> bool {
        self.breaker.closed()
    }

    pub fn faults(&self) -> u64 {
        self.breaker.total.load(Ordering::Relaxed)
    }

    pub fn disabled_for(&self) -> Option<Duration> {
        self.breaker.remaining()
    }

    /// Records a failed call; may take the plugin out of service for a while.
    pub fn fault(&self, kind: FaultKind, message: &str) {
        if kind == FaultKind::Memory {
            let advice = self.limits.advice(Limit::Memory, &self.source);
            self.reporter
                .fault(&self.name, kind, &format!("{message}; {advice}"));
        } else {
            self.reporter.fault(&self.name, kind, message);
        }
        if let Some(backoff) = self.breaker.record_fault() {
            self.reporter.disabled(&self.name, backoff);
        }
    }

    /// Records a failed setup (making an instance, giving it a route). One that ran out its
    /// whole setup deadline takes the plugin out of service at once: each try costs the setup
    /// thread a second, and other plugins' setups wait behind it.
    pub fn setup_fault(&self, kind: FaultKind, message: &str) {
        if kind != FaultKind::Timeout {
            return self.fault(kind, message);
        }
        self.take_out(kind, message);
    }

    /// A fault that takes the plugin out of service at once, whatever the breaker counted.
    fn take_out(&self, kind: FaultKind, message: &str) {
        self.reporter.fault(&self.name, kind, message);
        self.breaker.total.fetch_add(1, Ordering::Relaxed);
        let backoff = self.breaker.trip();
        self.reporter.disabled(&self.name, backoff);
    }

    pub fn succeeded(&self) {
        self.breaker.record_success();
    }

    /// Times one pick that called into the guest. More than one pick in a hundred over the
    /// budget, in a window of at least a hundred, puts the p99 over it: a fault, and the plugin
    /// goes out of service at once (the host picks meanwhile).
    pub fn timed_pick(&self, took: Duration) {
        self.pick_times.observe(took.as_secs_f64());
        let w = &self.picks;
        let now = now_ms();
        let start = w.start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) > WINDOW_MS
            && w.start_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            w.count.store(0, Ordering::Relaxed);
            w.over.store(0, Ordering::Relaxed);
        }
        let count = w.count.fetch_add(1, Ordering::Relaxed) + 1;
        // Built-ins are Harbor's own, measured in its benches: a clock that counts the time a
        // busy machine descheduled the thread must not take them out of service.
        let budget = self.limits.pick_budget;
        if took <= budget || self.source == Source::Builtin {
            return;
        }
        let over = w.over.fetch_add(1, Ordering::Relaxed) + 1;
        if count >= BUDGET_SAMPLE && over * 100 > count {
            // Judged once per window: counting starts afresh.
            w.count.store(0, Ordering::Relaxed);
            w.over.store(0, Ordering::Relaxed);
            let advice = self.limits.advice(Limit::PickBudget, &self.source);
            self.take_out(
                FaultKind::Slow,
                &format!(
                    "{over} of its last {count} picks took over its budget (the last {took:?}): its p99 is over budget; {advice}"
                ),
            );
        }
    }
}

pub(super) fn new_store(engine: &PluginEngine, limits: &Limits) -> Store<GuestState> {
    let mut store = Store::new(engine.engine(), GuestState::new(limits));
    store.limiter(|s| s.limits());
    store.epoch_deadline_callback(|mut ctx| ctx.data_mut().on_deadline());
    store
}

/// Sets the deadline of the next guest call, `ticks` epochs from now.
pub(super) fn arm(store: &mut Store<GuestState>, ticks: u64) {
    store.data_mut().start_call();
    store.set_epoch_deadline(ticks);
}

/// Runs one guest call under a deadline (in epoch ticks), describing a failure in words.
pub(super) fn call<T>(
    store: &mut Store<GuestState>,
    ticks: u64,
    f: impl FnOnce(&mut Store<GuestState>) -> wasmtime::Result<T>,
) -> Result<T, String> {
    arm(store, ticks);
    f(store).map_err(|e| {
        let (kind, message) = failure(store, &e);
        format!("{kind}: {message}")
    })
}

/// [`classify`], with what the guest printed during the call (a panic's message) quoted.
pub(super) fn failure(store: &Store<GuestState>, e: &wasmtime::Error) -> (FaultKind, String) {
    let (kind, mut message) = classify(e);
    if let Some(printed) = store.data().printed() {
        message.push_str(&format!("; it printed: {printed}"));
    }
    (kind, message)
}

/// A failure that hit one of the plugin's limits, with the limit named and how to raise it.
fn over_limits(why: String, limits: &Limits, source: &Source) -> String {
    if why.contains("instance count too high") {
        format!(
            "the component makes more core instances than allowed ({why}): {}",
            limits.advice(Limit::Instances, source)
        )
    } else if why.contains("memory") && (why.contains("grow") || why.contains("limit")) {
        format!("{why}: {}", limits.advice(Limit::Memory, source))
    } else {
        why
    }
}

/// The innermost cause of an error on one line, without dumps of the bytes involved.
fn one_line(e: &anyhow::Error) -> String {
    let root = e.root_cause().to_string();
    let first = root.lines().next().unwrap_or_default();
    first
        .split(" - expected=")
        .next()
        .unwrap_or(first)
        .trim()
        .to_owned()
}

/// Sorts a guest failure into what happened, for events and metrics, with a one-line message:
/// the trap and the guest function it happened in.
pub fn classify(e: &wasmtime::Error) -> (FaultKind, String) {
    let trap = e.downcast_ref::<wasmtime::Trap>().copied();
    let root = e.root_cause().to_string();
    let kind = match trap {
        Some(wasmtime::Trap::Interrupt) => FaultKind::Timeout,
        _ if root.contains("memory") && root.contains("grow") => FaultKind::Memory,
        _ => FaultKind::Trap,
    };
    let mut message = match kind {
        FaultKind::Timeout => "ran past its deadline and was interrupted".to_owned(),
        _ => trap.map_or(root, |t| t.to_string()),
    };
    if let Some(frame) = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| bt.frames().iter().find_map(|f| f.func_name()))
    {
        message.push_str(&format!(" (in {frame})"));
    }
    (kind, message)
}

fn sample_backends(n: u32, unhealthy: Option<u32>) -> Vec<Backend> {
    (0..n)
        .map(|i| Backend {
            address: format!("127.0.0.1:{}", 10_000 + i),
            weight: i + 1,
            healthy: Some(i) != unhealthy,
            labels: Vec::new(),
        })
        .collect()
}

/// Picks on sample backend sets, first tries and retries: every answer must be a usable,
/// non-excluded index. The set-up deadline applies, not the pick deadline: on a busy machine a
/// correct pick can be descheduled past the short one, and a looping pick is caught either way.
fn sample_picks(
    store: &mut Store<GuestState>,
    plugin: &guest::Plugin,
    wants_outcomes: bool,
) -> Result<(), Rejected> {
    let api = plugin.harbor_strategy_strategy();
    const ROUTE: u32 = 0;
    let backends = sample_backends(4, None);
    store.data_mut().loads = Some(Arc::new(super::load::LoadTable::default()));
    call(store, SETUP_DEADLINE_TICKS, |s| {
        api.call_configure_route(s, ROUTE, "{}")
    })
    .map_err(|e| Rejected(format!("configure-route(route 0, {{}}) failed: {e}")))?
    .map_err(|reason| {
        Rejected(format!(
            "configure-route(route 0, {{}}) refused a route without settings: {reason}"
        ))
    })?;
    let plan = call(store, SETUP_DEADLINE_TICKS, |s| {
        api.call_rebuild(s, ROUTE, &backends)
    })
    .map_err(|e| Rejected(format!("rebuild(route 0, 4 backends) failed: {e}")))?;
    check_plan(plan, 4)?;
    let check = |store: &mut Store<GuestState>,
                 n: u32,
                 (sequence, entropy, hash_key): (u64, u64, Option<u64>),
                 exclude: &[u32]| {
        let answer = call(store, SETUP_DEADLINE_TICKS, |s| {
            if exclude.is_empty() {
                api.call_pick(s, ROUTE, sequence, entropy, hash_key)
            } else {
                api.call_retry(s, ROUTE, sequence, entropy, hash_key, exclude)
            }
        });
        // The call as it was made, so that a failure names it exactly.
        let what = if exclude.is_empty() {
            format!("pick(route 0, sequence {sequence}, hash key {hash_key:?})")
        } else {
            format!(
                "retry(route 0, sequence {sequence}, hash key {hash_key:?}, exclude {exclude:?})"
            )
        };
        match answer {
            Err(e) => Err(Rejected(format!("{what} failed: {e}"))),
            Ok(None) => Err(Rejected(format!(
                "{what} chose nothing although {n} backends are usable"
            ))),
            Ok(Some(i)) if i >= n => Err(Rejected(format!(
                "{what} returned index {i} for a list of {n}"
            ))),
            Ok(Some(i)) if exclude.contains(&i) => Err(Rejected(format!(
                "{what} returned index {i}, which the request excluded"
            ))),
            Ok(Some(i)) => Ok(i),
        }
    };
    let started = Instant::now();
    for seq in 0..200u64 {
        let ask = (
            seq,
            seq.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            (seq % 2 == 0).then_some(seq.wrapping_mul(31)),
        );
        // A first try comes first: a guest that fails every call is named by its `pick`.
        let exclude: &[u32] = if seq % 5 == 4 { &[0, 1] } else { &[] };
        let i = check(store, 4, ask, exclude)?;
        if wants_outcomes {
            call(store, SETUP_DEADLINE_TICKS, |s| {
                api.call_done(s, ROUTE, i, guest::Outcome::Success, 1_000_000)
            })
            .map_err(|e| Rejected(format!("done(route 0, index {i}) failed: {e}")))?;
        }
    }
    let fewer = sample_backends(3, Some(1));
    let plan = call(store, SETUP_DEADLINE_TICKS, |s| {
        api.call_rebuild(s, ROUTE, &fewer)
    })
    .map_err(|e| Rejected(format!("rebuild(route 0, 3 backends) failed: {e}")))?;
    check_plan(plan, 3)?;
    for seq in 0..50u64 {
        let ask = (seq, seq.wrapping_mul(0xD1B5_4A32_D192_ED03), Some(seq));
        check(store, 3, ask, &[])?;
    }
    call(store, SETUP_DEADLINE_TICKS, |s| api.call_forget(s, ROUTE))
        .map_err(|e| Rejected(format!("forget(route 0) failed: {e}")))?;
    tracing::debug!(elapsed = ?started.elapsed(), "strategy sample picks passed");
    Ok(())
}

/// A pick plan, if the strategy made one, must name only the `n` backends it was given, and
/// some of them: every sample backend set has usable backends.
fn check_plan(plan: Option<guest::PickPlan>, n: usize) -> Result<(), Rejected> {
    let Some(plan) = plan else {
        return Ok(());
    };
    let loads = LoadTable::new((0..n).map(|_| Default::default()).collect());
    let plan = super::plan::Plan::check(plan, &loads)
        .map_err(|fault| Rejected(format!("rebuild returned {}", fault.message)))?;
    if plan.is_empty() {
        return Err(Rejected(format!(
            "rebuild returned an empty pick plan although {n} backends are usable"
        )));
    }
    Ok(())
}

/// Counts faults in a window; too many take the plugin out of service for a backoff that
/// doubles each time it trips, and a success after a trip resets it.
#[derive(Default)]
struct Breaker {
    total: AtomicU64,
    window_faults: AtomicU32,
    window_start_ms: AtomicU64,
    trips: AtomicU32,
    disabled_until_ms: AtomicU64,
}

const WINDOW_MS: u64 = 10_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Breaker {
    fn closed(&self) -> bool {
        let until = self.disabled_until_ms.load(Ordering::Relaxed);
        until == 0 || now_ms() >= until
    }

    fn remaining(&self) -> Option<Duration> {
        let until = self.disabled_until_ms.load(Ordering::Relaxed);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Returns the backoff if this fault trips the breaker.
    fn record_fault(&self) -> Option<Duration> {
        self.total.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) > WINDOW_MS {
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.window_faults.store(0, Ordering::Relaxed);
        }
        if self.window_faults.fetch_add(1, Ordering::Relaxed) + 1 < FAULTS_TO_TRIP {
            return None;
        }
        self.window_faults.store(0, Ordering::Relaxed);
        let trips = self.trips.fetch_add(1, Ordering::Relaxed);
        let backoff = OUT_OF_SERVICE.after(trips.saturating_add(1));
        self.disabled_until_ms
            .store(now + backoff.as_millis() as u64, Ordering::Relaxed);
        Some(backoff)
    }

    /// Takes the plugin out of service now; returns for how long.
    fn trip(&self) -> Duration {
        let trips = self.trips.fetch_add(1, Ordering::Relaxed);
        let backoff = OUT_OF_SERVICE.after(trips.saturating_add(1));
        self.disabled_until_ms
            .store(now_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
        backoff
    }

    fn record_success(&self) {
        // A relaxed read per pick; the writes happen only after a trip.
        if self.trips.load(Ordering::Relaxed) > 0 && self.closed() {
            self.trips.store(0, Ordering::Relaxed);
            self.disabled_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_trips_after_repeated_faults_and_backs_off() {
        let b = Breaker::default();
        for _ in 0..FAULTS_TO_TRIP - 1 {
            assert!(b.record_fault().is_none());
        }
        assert_eq!(b.record_fault(), Some(OUT_OF_SERVICE.first));
        assert!(!b.closed());
        for _ in 0..FAULTS_TO_TRIP - 1 {
            b.record_fault();
        }
        assert_eq!(b.record_fault(), Some(OUT_OF_SERVICE.first * 2));
        assert_eq!(
            b.total.load(Ordering::Relaxed),
            u64::from(FAULTS_TO_TRIP) * 2
        );
    }
}
