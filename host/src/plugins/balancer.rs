//! The host side of a route's load balancing: its backend set (with the live load of each
//! backend), a pick sequence shared by all threads, the strategy it uses (swappable at runtime),
//! and the host's own round-robin for when the strategy cannot answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};

use super::catalog::Slot;
use super::guest::Backend;
use super::load::{BackendLoad, InFlight, LoadTable};
use super::shadow::Shadow;
use super::shard;

/// One backend as the route knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub address: String,
    pub weight: u32,
    pub healthy: bool,
    pub labels: Vec<(String, String)>,
}

/// An immutable backend set; a change makes a new one with a new version.
#[derive(Debug, Clone)]
pub struct BackendSet {
    pub version: u64,
    pub backends: Vec<BackendSpec>,
    pub loads: Arc<LoadTable>,
    /// The route's settings for its strategy, JSON text (`{}` when it has none).
    pub settings: Arc<str>,
    guest: Vec<Backend>,
}

impl BackendSet {
    pub fn guest_backends(&self) -> &[Backend] {
        &self.guest
    }
}

static IDS: AtomicU64 = AtomicU64::new(1);

/// Routes a thread keeps its own state for before it drops them all.
const MAX_LOCAL_ROUTES: usize = 4096;

thread_local! {
    /// This thread's own state for each balancer it picks for (see [`Balancer::local`]).
    static LOCAL: std::cell::RefCell<shard::IdMap<Local>> =
        std::cell::RefCell::new(shard::IdMap::default());
}

/// What one thread keeps for one route.
struct Local {
    /// Its own copy of the route's backend set.
    set: Arc<BackendSet>,
    numbers: Numbers,
}

/// A thread's share of a route's pick sequence.
///
/// Picks take numbers from the route's one counter, one at a time, so that a strategy cycling on
/// them is exact across threads. Two threads picking for one route in a tight loop would then pass
/// the counter's cache line back and forth on every pick (see host/benches/README.md, Strategy
/// pick cost), so a thread that finds another one taking numbers between its own picks, less than
/// [`DENSE`] apart per pick, takes the next numbers in a block, doubling it each time up to
/// [`MAX_BLOCK`]; otherwise it goes back to one number at a time. A proxy's picks are a request
/// apart (tens of microseconds on a thread), so a route's picks cycle exactly across threads; only
/// a route picked for millions of times a second on several threads cycles exactly block by block
/// instead.
#[derive(Default)]
struct Numbers {
    next: u64,
    end: u64,
    block: u64,
    /// When this thread last took numbers, and how many.
    taken: Option<(Instant, u64)>,
}

/// Picks closer than this on one thread, while other threads take numbers too, are dense
/// enough to take numbers in blocks.
const DENSE: Duration = Duration::from_micros(1);
/// The largest block of sequence numbers a thread takes at once.
const MAX_BLOCK: u64 = 64;

impl Numbers {
    /// The next number, from `counter` or this thread's block; `now` reads the clock, which is
    /// needed only when other threads are taking numbers too.
    fn take(&mut self, counter: &AtomicU64, now: impl FnOnce() -> Instant) -> u64 {
        if self.next < self.end {
            self.next += 1;
            return self.next - 1;
        }
        let block = self.block.max(1);
        let start = counter.fetch_add(block, Ordering::Relaxed);
        if start == self.end {
            // Nobody else took numbers since this thread's last ones: nothing to share.
            self.block = 1;
            self.taken = None;
        } else {
            let now = now();
            let dense = self.taken.is_some_and(|(at, taken)| {
                now.saturating_duration_since(at) < DENSE.saturating_mul(taken as u32)
            });
            self.block = if dense { (block * 2).min(MAX_BLOCK) } else { 1 };
            self.taken = Some((now, block));
        }
        self.next = start.wrapping_add(1);
        self.end = start.wrapping_add(block);
        start
    }
}

pub struct Balancer {
    id: u64,
    alive: Arc<()>,
    strategy: ArcSwap<Slot>,
    set: ArcSwap<BackendSet>,
    /// Serialises the writers of `set` (registry sync, health changes), so that neither loses
    /// the other's update; readers never take it.
    writer: Mutex<()>,
    sequence: Counter,
    /// A candidate strategy picking beside the live one, compared and never used.
    shadow: ArcSwapOption<Shadow>,
    /// Whether `shadow` holds one: a plain load on every pick, cheaper than loading the shadow
    /// itself (see host/benches/README.md, Strategy pick cost).
    shadowed: std::sync::atomic::AtomicBool,
}

/// The pick counter on a cache line of its own: taking numbers must not evict the pointers that
/// every pick reads (`set`, `strategy`) from the other cores' caches.
#[repr(align(64))]
#[derive(Default)]
struct Counter(AtomicU64);

/// A chosen backend, with the set it was chosen from.
pub struct Picked {
    pub set: Arc<BackendSet>,
    pub index: usize,
    /// True when the host's fallback chose, not the strategy.
    pub fallback: bool,
}

impl Picked {
    pub fn backend(&self) -> &BackendSpec {
        &self.set.backends[self.index]
    }

    pub fn load(&self) -> Option<&Arc<BackendLoad>> {
        self.set.loads.get(self.index)
    }

    /// Counts the connection or request as in flight until the guard is dropped.
    pub fn start(&self) -> Option<InFlight> {
        self.load().map(|l| l.start())
    }
}

impl Balancer {
    pub fn new(strategy: Arc<Slot>, backends: Vec<BackendSpec>) -> Self {
        let balancer = Self {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            alive: Arc::new(()),
            strategy: ArcSwap::new(strategy),
            set: ArcSwap::new(Arc::new(BackendSet {
                version: 0,
                backends: Vec::new(),
                loads: Arc::default(),
                settings: Arc::from("{}"),
                guest: Vec::new(),
            })),
            writer: Mutex::new(()),
            sequence: Counter::default(),
            shadow: ArcSwapOption::empty(),
            shadowed: std::sync::atomic::AtomicBool::new(false),
        };
        balancer.set_backends(backends);
        balancer
    }

    pub fn strategy_name(&self) -> String {
        self.strategy.load().name.clone()
    }

    /// Switches the route to another strategy; picks already made are unaffected.
    pub fn set_strategy(&self, strategy: Arc<Slot>) {
        self.strategy.store(strategy);
    }

    /// Sets or removes the candidate strategy that picks beside the live one.
    pub fn set_shadow(&self, shadow: Option<Arc<Shadow>>) {
        self.shadowed.store(shadow.is_some(), Ordering::Relaxed);
        self.shadow.store(shadow);
    }

    pub fn shadow(&self) -> Option<Arc<Shadow>> {
        self.shadow.load_full()
    }

    /// Replaces the backend set, keeping the load counters (and so the health) of backends that
    /// stay. A backend is healthy in the set when the registry says so and the proxy's health
    /// checks and cooldowns have not taken it out.
    pub fn set_backends(&self, backends: Vec<BackendSpec>) {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.set.load();
        let loads: Vec<Arc<BackendLoad>> = backends
            .iter()
            .map(|b| {
                old.backends
                    .iter()
                    .position(|o| o.address == b.address)
                    .and_then(|i| old.loads.get(i).cloned())
                    .unwrap_or_default()
            })
            .collect();
        let backends: Vec<BackendSpec> = backends
            .into_iter()
            .zip(&loads)
            .map(|(mut b, load)| {
                b.healthy = b.healthy && load.is_up();
                b
            })
            .collect();
        if old.backends == backends && old.version > 0 {
            return;
        }
        self.publish(&old, backends, loads);
    }

    /// Gives the route new settings for its strategy: a new backend set version, which every
    /// thread's instance is given (settings, then backends) before it picks again.
    pub fn set_settings(&self, settings: Arc<str>) {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.set.load_full();
        if old.settings == settings {
            return;
        }
        self.set.store(Arc::new(BackendSet {
            version: old.version + 1,
            settings,
            ..BackendSet::clone(&old)
        }));
    }

    /// Re-reads the health of every backend; call after a health check or cooldown changed one.
    /// Returns the set now in force.
    pub fn refresh_health(&self) -> Arc<BackendSet> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.set.load_full();
        let mut changed = false;
        let backends = old
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let up = old.loads.get(i).is_none_or(|l| l.is_up());
                changed |= b.healthy != up;
                BackendSpec {
                    healthy: up,
                    ..b.clone()
                }
            })
            .collect();
        if changed {
            let loads = (0..old.backends.len())
                .filter_map(|i| old.loads.get(i).cloned())
                .collect();
            self.publish(&old, backends, loads);
        }
        self.set.load_full()
    }

    fn publish(&self, old: &BackendSet, backends: Vec<BackendSpec>, loads: Vec<Arc<BackendLoad>>) {
        let guest = backends
            .iter()
            .map(|b| Backend {
                address: b.address.clone(),
                weight: b.weight,
                healthy: b.healthy,
                labels: b.labels.clone(),
            })
            .collect();
        self.set.store(Arc::new(BackendSet {
            version: old.version + 1,
            backends,
            loads: Arc::new(LoadTable::new(loads)),
            settings: old.settings.clone(),
            guest,
        }));
    }

    /// `set` as a reference this thread owns (its own copy, made once per version), and the
    /// sequence number of this pick (see [`Numbers`]). A pick hands its caller a counted
    /// reference to the set it chose from; counting references to the one shared set made both
    /// cores write one cache line on every pick.
    fn local(&self, set: &BackendSet) -> (Arc<BackendSet>, u64) {
        LOCAL.with(|cell| {
            let Ok(mut locals) = cell.try_borrow_mut() else {
                let sequence = self.sequence.0.fetch_add(1, Ordering::Relaxed);
                return (Arc::new(set.clone()), sequence);
            };
            if !locals.contains_key(&self.id) && locals.len() >= MAX_LOCAL_ROUTES {
                locals.clear();
            }
            let local = locals.entry(self.id).or_insert_with(|| Local {
                set: Arc::new(set.clone()),
                numbers: Numbers::default(),
            });
            if local.set.version != set.version {
                local.set = Arc::new(set.clone());
            }
            (
                local.set.clone(),
                local.numbers.take(&self.sequence.0, Instant::now),
            )
        })
    }

    pub fn backends(&self) -> Arc<BackendSet> {
        self.set.load_full()
    }

    /// Whether some backend is healthy and not in `exclude`. Reads the set without counting a
    /// reference to it: every connection asks, and a shared count is a cache line both cores
    /// would write each time.
    pub fn any_usable(&self, exclude: &[u32]) -> bool {
        self.set
            .load()
            .backends
            .iter()
            .enumerate()
            .any(|(i, b)| b.healthy && !exclude.contains(&(i as u32)))
    }

    /// Chooses a backend. `exclude` lists indexes already tried for this request.
    pub fn pick(&self, hash_key: Option<u64>, exclude: &[u32]) -> Option<Picked> {
        let set = self.set.load();
        if set.backends.is_empty() {
            return None;
        }
        let (local, sequence) = self.local(&set);
        let ask = shard::Ask {
            sequence,
            entropy: fastrand::u64(..),
            hash_key,
            exclude,
        };
        let picked = self.choose(&set, local, &ask);
        if exclude.is_empty()
            && self.shadowed.load(Ordering::Relaxed)
            && let Some(picked) = &picked
            && let Some(shadow) = self.shadow.load().as_ref()
        {
            self.compare(shadow, picked, &ask);
        }
        picked
    }

    /// The live strategy's pick, or the host's when it cannot answer.
    #[inline(always)]
    fn choose(
        &self,
        set: &Arc<BackendSet>,
        local: Arc<BackendSet>,
        ask: &shard::Ask<'_>,
    ) -> Option<Picked> {
        let (sequence, exclude) = (ask.sequence, ask.exclude);
        let slot = self.strategy.load();
        let current = slot.current();
        if let Some(loaded) = current.as_ref().filter(|l| l.in_service()) {
            match shard::pick(loaded, self.id, &self.alive, set, ask) {
                Ok(shard::Answer::Chose(Some(i)))
                    if (i as usize) < set.backends.len() && !exclude.contains(&i) =>
                {
                    loaded.succeeded();
                    return Some(Picked {
                        set: local,
                        index: i as usize,
                        fallback: false,
                    });
                }
                // No backend is a fair answer only when none is usable; otherwise it would
                // fail the request (a 503) for no reason: a fault, and the host picks.
                Ok(shard::Answer::Chose(None)) if !usable(set, exclude) => return None,
                Ok(shard::Answer::Chose(None)) => loaded.fault(
                    super::report::FaultKind::BadAnswer,
                    "answered no backend while healthy ones were left",
                ),
                // Its instance for this thread is being made: the host picks meanwhile.
                Ok(shard::Answer::Preparing) => {}
                Ok(shard::Answer::Chose(Some(i))) => loaded.fault(
                    super::report::FaultKind::BadAnswer,
                    &format!("picked index {i}, which is out of range or excluded"),
                ),
                Err(fault) => loaded.fault(fault.kind, &fault.message),
            }
            loaded.reporter.fell_back(&loaded.name);
        } else {
            shard::tidy();
            slot.reporter.fell_back_name(&slot.name);
        }
        fallback(set, sequence, exclude).map(|index| Picked {
            set: local,
            index,
            fallback: true,
        })
    }

    /// Asks the shadow what it would have picked for the same first try, and counts it beside
    /// the live pick. Its faults are its own: they count against its breaker, and the live
    /// pick stands.
    #[inline(never)]
    fn compare(&self, shadow: &Shadow, live: &Picked, ask: &shard::Ask<'_>) {
        if Arc::ptr_eq(&shadow.slot, &self.strategy.load()) {
            // The live strategy itself: asking it twice would move its state on.
            return;
        }
        let set = &live.set;
        let current = shadow.slot.current();
        let answer =
            current
                .as_ref()
                .filter(|l| l.in_service())
                .and_then(
                    |loaded| match shard::pick(loaded, self.id, &self.alive, set, ask) {
                        Ok(shard::Answer::Chose(Some(i))) if (i as usize) < set.backends.len() => {
                            loaded.succeeded();
                            Some(i as usize)
                        }
                        Ok(shard::Answer::Chose(Some(i))) => {
                            loaded.fault(
                                super::report::FaultKind::BadAnswer,
                                &format!("picked index {i}, which is out of range (as a shadow)"),
                            );
                            None
                        }
                        Ok(shard::Answer::Chose(None)) if usable(set, &[]) => {
                            loaded.fault(
                                super::report::FaultKind::BadAnswer,
                                "answered no backend while healthy ones were left (as a shadow)",
                            );
                            None
                        }
                        Ok(_) => None,
                        Err(fault) => {
                            loaded.fault(fault.kind, &fault.message);
                            None
                        }
                    },
                );
        shadow.record(set, live.index, answer);
    }

    /// Reports how a request ended, to strategies that asked for outcomes, and updates the
    /// backend's latency average.
    pub fn done(
        &self,
        picked: &Picked,
        outcome: super::guest::Outcome,
        latency: std::time::Duration,
    ) {
        if let Some(load) = picked.load() {
            load.observe(latency);
        }
        if picked.fallback {
            return;
        }
        let slot = self.strategy.load();
        let current = slot.current();
        if let Some(loaded) = current.as_ref().filter(|l| l.description.wants_outcomes) {
            let ns = latency.as_nanos().min(u128::from(u64::MAX)) as u64;
            shard::done(loaded, self.id, picked.index as u32, outcome, ns);
        }
    }
}

/// Whether a healthy backend is left outside `exclude`.
fn usable(set: &BackendSet, exclude: &[u32]) -> bool {
    set.backends
        .iter()
        .enumerate()
        .any(|(i, b)| b.healthy && !exclude.contains(&(i as u32)))
}

/// The host's own round-robin over healthy, non-excluded backends (over all non-excluded ones
/// when none is healthy).
pub fn fallback(set: &BackendSet, sequence: u64, exclude: &[u32]) -> Option<usize> {
    let usable = |healthy_only: bool| {
        set.backends
            .iter()
            .enumerate()
            .filter(move |(i, b)| (!healthy_only || b.healthy) && !exclude.contains(&(*i as u32)))
            .map(|(i, _)| i)
    };
    let healthy = usable(true).count();
    let (healthy_only, n) = if healthy > 0 {
        (true, healthy)
    } else {
        (false, usable(false).count())
    };
    if n == 0 {
        return None;
    }
    usable(healthy_only).nth((sequence % n as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One thread's picks, `gap` apart.
    struct Thread {
        numbers: Numbers,
        now: Instant,
        gap: Duration,
    }

    impl Thread {
        fn new(gap: Duration) -> Self {
            Self {
                numbers: Numbers::default(),
                now: Instant::now(),
                gap,
            }
        }

        fn take(&mut self, counter: &AtomicU64) -> u64 {
            self.now += self.gap;
            let now = self.now;
            self.numbers.take(counter, || now)
        }
    }

    #[test]
    fn picks_a_request_apart_are_numbered_one_after_another_across_threads() {
        let counter = AtomicU64::new(0);
        let gap = Duration::from_micros(20);
        let (mut a, mut b) = (Thread::new(gap), Thread::new(gap));
        let taken: Vec<u64> = (0..100)
            .map(|i| {
                if i % 3 == 0 {
                    a.take(&counter)
                } else {
                    b.take(&counter)
                }
            })
            .collect();
        assert_eq!(taken, (0..100).collect::<Vec<u64>>());
    }

    #[test]
    fn dense_picks_on_two_threads_take_blocks_and_sparse_ones_single_numbers_again() {
        let counter = AtomicU64::new(0);
        let dense = Duration::from_nanos(100);
        let (mut a, mut b) = (Thread::new(dense), Thread::new(dense));
        for _ in 0..1000 {
            a.take(&counter);
            b.take(&counter);
        }
        assert_eq!(a.numbers.block, MAX_BLOCK);
        assert_eq!(b.numbers.block, MAX_BLOCK);

        // Traffic thins out: once their blocks are used up, both threads take one number at a
        // time again and the numbers are consecutive.
        a.gap = Duration::from_micros(50);
        b.gap = Duration::from_micros(50);
        for _ in 0..2 * MAX_BLOCK {
            a.take(&counter);
            b.take(&counter);
        }
        let taken: Vec<u64> = (0..20)
            .flat_map(|_| [a.take(&counter), b.take(&counter)])
            .collect();
        let first = taken[0];
        assert_eq!(taken, (first..first + 40).collect::<Vec<u64>>());
    }

    #[test]
    fn threads_racing_for_numbers_never_get_the_same_one() {
        let counter = Arc::new(AtomicU64::new(0));
        let per_thread = 200_000;
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut numbers = Numbers::default();
                    (0..per_thread)
                        .map(|_| numbers.take(&counter, Instant::now))
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("picking thread"))
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 2 * per_thread);
        // Numbers a thread took in a block but had not used yet are all that is skipped.
        let last = *all.last().expect("numbers");
        assert!(last < (2 * per_thread) as u64 + 2 * MAX_BLOCK, "{last}");
    }
}
