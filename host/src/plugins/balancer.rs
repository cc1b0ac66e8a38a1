//! The host side of a route's load balancing: its backend set (with the live load of each
//! backend), a pick sequence shared by all threads, the strategy it uses (swappable at runtime),
//! and the host's own round-robin for when the strategy cannot answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::catalog::Slot;
use super::guest::Backend;
use super::load::{BackendLoad, InFlight, LoadTable};
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
    guest: Vec<Backend>,
}

impl BackendSet {
    pub fn guest_backends(&self) -> &[Backend] {
        &self.guest
    }
}

static IDS: AtomicU64 = AtomicU64::new(1);

/// Routes whose backend-set copies a thread keeps before it drops them all.
const MAX_LOCAL_SETS: usize = 4096;

thread_local! {
    /// This thread's own copy of each balancer's backend set (see [`Balancer::local_set`]).
    static LOCAL_SETS: std::cell::RefCell<shard::IdMap<Arc<BackendSet>>> =
        std::cell::RefCell::new(shard::IdMap::default());
}

pub struct Balancer {
    id: u64,
    alive: Arc<()>,
    strategy: ArcSwap<Slot>,
    set: ArcSwap<BackendSet>,
    /// Serialises the writers of `set` (registry sync, health changes), so that neither loses
    /// the other's update; readers never take it.
    writer: Mutex<()>,
    sequence: AtomicU64,
}

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
                guest: Vec::new(),
            })),
            writer: Mutex::new(()),
            sequence: AtomicU64::new(0),
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
            guest,
        }));
    }

    /// `set` as a reference this thread owns: its own copy, made once per version. A pick hands
    /// its caller a counted reference to the set it chose from; counting references to the one
    /// shared set made both cores write one cache line on every pick (round-robin with two
    /// threads cost 3–5 times one).
    fn local_set(&self, set: &BackendSet) -> Arc<BackendSet> {
        LOCAL_SETS.with(|cell| {
            let Ok(mut sets) = cell.try_borrow_mut() else {
                return Arc::new(set.clone());
            };
            if let Some(local) = sets.get(&self.id)
                && local.version == set.version
            {
                return local.clone();
            }
            if sets.len() > MAX_LOCAL_SETS {
                sets.clear();
            }
            let local = Arc::new(set.clone());
            sets.insert(self.id, local.clone());
            local
        })
    }

    /// The sequence number of the next pick: one counter for all threads, so that a strategy
    /// cycling on it is exact across them (a per-thread block of numbers was tried: cheaper
    /// with two cores, but a route's picks then cycle exactly only per thread).
    fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::Relaxed)
    }

    pub fn backends(&self) -> Arc<BackendSet> {
        self.set.load_full()
    }

    /// Chooses a backend. `exclude` lists indexes already tried for this request.
    pub fn pick(&self, hash_key: Option<u64>, exclude: &[u32]) -> Option<Picked> {
        let set = self.set.load();
        if set.backends.is_empty() {
            return None;
        }
        let sequence = self.next_sequence();
        let slot = self.strategy.load();
        let current = slot.current();
        if let Some(loaded) = current.as_ref().filter(|l| l.in_service()) {
            let ask = shard::Ask {
                sequence,
                entropy: fastrand::u64(..),
                hash_key,
                exclude,
            };
            match shard::pick(loaded, self.id, &self.alive, &set, &ask) {
                Ok(Some(i)) if (i as usize) < set.backends.len() && !exclude.contains(&i) => {
                    loaded.succeeded();
                    return Some(Picked {
                        set: self.local_set(&set),
                        index: i as usize,
                        fallback: false,
                    });
                }
                Ok(None) => return None,
                Ok(Some(i)) => loaded.fault(
                    super::report::FaultKind::BadAnswer,
                    &format!("picked index {i}, which is out of range or excluded"),
                ),
                Err(fault) => loaded.fault(fault.kind, &fault.message),
            }
            loaded.reporter.fell_back(&loaded.name);
        } else {
            slot.reporter.fell_back_name(&slot.name);
        }
        fallback(&set, sequence, exclude).map(|index| Picked {
            set: self.local_set(&set),
            index,
            fallback: true,
        })
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
