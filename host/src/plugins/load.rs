//! Live load per backend, kept by the host: in-flight counts and a peak-sensitive latency EWMA.
//! Each backend's counters live behind their own `Arc`, so a new backend set reuses the counters
//! of the backends it keeps and a request that started before the change still finishes on the
//! right counter.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct BackendLoad {
    in_flight: AtomicU32,
    ewma_ns: AtomicU64,
    /// Set by the active health check after `fall` failures, cleared after `rise` passes.
    check_down: AtomicBool,
    /// Until when (in [`clock_ns`]) a failed connect keeps the backend out; 0 when not cooling.
    cooldown_until: AtomicU64,
}

/// Nanoseconds on a monotonic clock private to this process, never 0.
pub fn clock_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    base.elapsed().as_nanos().min(u128::from(u64::MAX - 1)) as u64 + 1
}

impl BackendLoad {
    /// Whether the backend may get new work: not failed by its health check, not cooling down.
    pub fn is_up(&self) -> bool {
        if self.check_down.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.cooldown_until.load(Ordering::Relaxed);
        until == 0 || clock_ns() >= until
    }

    /// Records a health check's verdict; true when it changed.
    pub fn set_checked(&self, up: bool) -> bool {
        self.check_down.swap(!up, Ordering::Relaxed) == up
    }

    /// Keeps the backend out for `cooldown`; true when it was not already cooling down.
    pub fn cool_down(&self, cooldown: Duration) -> bool {
        let now = clock_ns();
        let until = now.saturating_add(cooldown.as_nanos().min(u128::from(u64::MAX)) as u64);
        let before = self.cooldown_until.swap(until, Ordering::Relaxed);
        before == 0 || before <= now
    }

    /// Ends a cooldown early (a connect succeeded); true when one was running.
    pub fn clear_cooldown(&self) -> bool {
        let before = self.cooldown_until.swap(0, Ordering::Relaxed);
        before != 0 && before > clock_ns()
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn latency_ewma_ns(&self) -> u64 {
        self.ewma_ns.load(Ordering::Relaxed)
    }

    /// Counts a connection or request until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Folds in a latency sample: a slower sample is taken at once (the "peak" in peak-EWMA, so
    /// a backend that slows down is avoided quickly), a faster one decays in by 1/8.
    pub fn observe(&self, latency: Duration) {
        let sample = latency.as_nanos().min(u128::from(u64::MAX)) as u64;
        let _ = self
            .ewma_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 || sample >= old {
                    sample
                } else {
                    old - (old - sample) / 8
                })
            });
    }
}

/// Holds one unit of a backend's in-flight count.
#[derive(Debug)]
pub struct InFlight(Arc<BackendLoad>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The loads of one backend set, in the set's order.
#[derive(Debug, Default)]
pub struct LoadTable {
    entries: Vec<Arc<BackendLoad>>,
}

impl LoadTable {
    pub fn new(entries: Vec<Arc<BackendLoad>>) -> Self {
        Self { entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<&Arc<BackendLoad>> {
        self.entries.get(index)
    }

    pub fn in_flight(&self, index: usize) -> u32 {
        self.entries.get(index).map_or(0, |l| l.in_flight())
    }

    pub fn latency_ewma_ns(&self, index: usize) -> u64 {
        self.entries.get(index).map_or(0, |l| l.latency_ewma_ns())
    }

    /// Every backend's in-flight count, in the set's order.
    pub fn in_flight_all(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.iter().map(|l| l.in_flight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_follows_guards() {
        let load = Arc::new(BackendLoad::default());
        let a = load.start();
        let b = load.start();
        assert_eq!(load.in_flight(), 2);
        drop(a);
        assert_eq!(load.in_flight(), 1);
        drop(b);
        assert_eq!(load.in_flight(), 0);
    }

    #[test]
    fn ewma_rises_at_once_and_decays_slowly() {
        let load = BackendLoad::default();
        load.observe(Duration::from_millis(10));
        assert_eq!(load.latency_ewma_ns(), 10_000_000);
        load.observe(Duration::from_millis(50));
        assert_eq!(load.latency_ewma_ns(), 50_000_000);
        load.observe(Duration::from_millis(10));
        assert_eq!(load.latency_ewma_ns(), 45_000_000);
    }
}
