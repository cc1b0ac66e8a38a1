//! The machine's CPU time from `/proc/stat`, for benchmarks that report how busy the machine
//! was while they measured.

// Each benchmark uses its own part of this module.
#![allow(dead_code)]

/// A run during which the hypervisor took this share of the machine's CPU time or more
/// measured the neighbours, not the software under test: benchmarks leave it out of medians.
pub const MAX_STOLEN_PCT: f64 = 10.0;

/// The machine's CPU time counters (all CPUs), in clock ticks.
#[derive(Clone, Copy)]
pub struct MachineTicks {
    /// Unused time: idle and waiting for I/O.
    pub idle: u64,
    /// Time the hypervisor gave this machine's CPUs to someone else.
    pub steal: u64,
    pub total: u64,
}

impl MachineTicks {
    pub fn now() -> Option<Self> {
        // The first line: cpu user nice system idle iowait irq softirq steal ...
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .take(8)
            .map(|t| t.parse().ok())
            .collect::<Option<_>>()?;
        Some(Self {
            idle: ticks.get(3)? + ticks.get(4)?,
            steal: *ticks.get(7)?,
            total: ticks.iter().sum(),
        })
    }

    pub fn busy(&self) -> u64 {
        self.total.saturating_sub(self.idle)
    }

    /// The share of the machine's CPU time that went unused since `before`, in percent.
    pub fn idle_pct_since(&self, before: &Self) -> f64 {
        let total = self.total.saturating_sub(before.total).max(1) as f64;
        100.0 * self.idle.saturating_sub(before.idle) as f64 / total
    }

    /// The share of the machine's CPU time stolen by the hypervisor since `before`, in percent.
    pub fn steal_pct_since(&self, before: &Self) -> f64 {
        let total = self.total.saturating_sub(before.total).max(1) as f64;
        100.0 * self.steal.saturating_sub(before.steal) as f64 / total
    }
}
