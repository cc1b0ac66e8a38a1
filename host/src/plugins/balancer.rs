//! The host side of a route's load balancing: its backend set (with the live load of each
//! backend), a pick sequence shared by all threads, the strategy it uses (swappable at runtime),
//! and the host's own round-robin for when the strategy cannot answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use super::catalog::Slot;
use super::guest::{Backend, Request};
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
#[derive(Debug)]
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

pub struct Balancer {
    id: u64,
    alive: Arc<()>,
    strategy: ArcSwap<Slot>,
    set: ArcSwap<BackendSet>,
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

    /// Replaces the backend set, keeping the load counters of backends that stay.
    pub fn set_backends(&self, backends: Vec<BackendSpec>) {
        let old = self.set.load();
        if old.backends == backends && old.version > 0 {
            return;
        }
        let loads = backends
            .iter()
            .map(|b| {
                old.backends
                    .iter()
                    .position(|o| o.address == b.address)
                    .and_then(|i| old.loads.get(i).cloned())
                    .unwrap_or_default()
            })
            .collect();
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

    pub fn backends(&self) -> Arc<BackendSet> {
        self.set.load_full()
    }

    /// Chooses a backend. `exclude` lists indexes already tried for this request.
    pub fn pick(&self, hash_key: Option<u64>, exclude: &[u32]) -> Option<Picked> {
        let set = self.set.load_full();
        if set.backends.is_empty() {
            return None;
        }
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let slot = self.strategy.load();
        let current = slot.current();
        if let Some(loaded) = current.as_ref().filter(|l| l.in_service()) {
            let request = Request {
                sequence,
                entropy: fastrand::u64(..),
                hash_key,
                exclude: exclude.to_vec(),
            };
            match shard::pick(loaded, self.id, &self.alive, &set, &request) {
                Ok(Some(i)) if (i as usize) < set.backends.len() && !exclude.contains(&i) => {
                    loaded.succeeded();
                    return Some(Picked {
                        set,
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
            set,
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
