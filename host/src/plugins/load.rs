//! Live load per backend, kept by the host: in-flight counts and a peak-sensitive latency EWMA.
//! Each backend's counters live behind their own `Arc`, so a new backend set reuses the counters
//! of the backends it keeps and a request that started before the change still finishes on the
//! right counter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct BackendLoad {
    in_flight: AtomicU32,
    ewma_ns: AtomicU64,
}

impl BackendLoad {
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

    pub fn get(&self, index: usize) -> Option<&Arc<BackendLoad>> {
        self.entries.get(index)
    }

    pub fn in_flight(&self, index: usize) -> u32 {
        self.entries.get(index).map_or(0, |l| l.in_flight())
    }

    pub fn latency_ewma_ns(&self, index: usize) -> u64 {
        self.entries.get(index).map_or(0, |l| l.latency_ewma_ns())
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
