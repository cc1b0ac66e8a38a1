//! The guest SDK of Harbor's built-in load-balancing strategies. A strategy crate implements
//! [`Algorithm`] in a plain module, unit-tested natively, and its `lib.rs` makes a component of
//! it with one line, `harbor_strategy_common::strategy!(round_robin::RoundRobin);` (see
//! [`strategy!`] for a whole example).
//!
//! - [`algorithm`]: the [`Algorithm`] trait, what differs from one strategy to the next.
//! - [`guest`]: the glue to the WIT contract, written once, and the [`strategy!`] macro.
//! - [`bindings`]: the contract's bindings, generated once by wit-bindgen for every strategy.
//! - [`backends`]: the compact backend list a balancer keeps, and the candidate set of one pick
//!   (health, retries' exclusions, the "panic" fallback when nothing is healthy).
//! - [`hash`]: stable hashing of addresses and turning the host's random bits into choices.
//! - [`load`]: the host's live load seen through a trait, and load-per-weight comparisons.
//! - [`config`]: the strict, flat JSON settings that `configure` accepts.

pub mod algorithm;
pub mod backends;
pub mod bindings;
pub mod config;
pub mod guest;
pub mod hash;
pub mod load;

pub use algorithm::Algorithm;
pub use backends::{Backend, Backends, Candidates};
pub use load::Load;

/// What one pick knows, gathered from the host's `pick` or `retry` call so that algorithms need
/// not see the generated bindings. `exclude` is empty on a first try.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickRequest<'a> {
    /// The route's pick counter, shared by all worker threads.
    pub sequence: u64,
    /// Fresh random bits for this pick.
    pub entropy: u64,
    /// A stable hash of the route's hash key, when the host has one.
    pub hash_key: Option<u64>,
    /// Backends a retry must not pick again.
    pub exclude: &'a [u32],
}

/// How the host answers first tries without calling the strategy, until the next rebuild (the
/// contract's `pick-plan`, which defines each rule exactly).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PickPlan {
    /// The picks written out.
    Table(PickTable),
    /// The candidate with the least load per unit of weight, scanning from `sequence % len`.
    LeastLoaded(LoadRule),
    /// Power of two choices among the candidates, drawn in proportion to weight.
    TwoChoices(LoadRule),
}

/// What a load rule compares (see [`load::cmp_per_weight`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadMeasure {
    InFlight,
    /// `latency × (in_flight + 1)`, with this latency (ns) for a backend not measured yet.
    PeakEwma {
        unmeasured_ns: u64,
    },
}

/// A load rule's candidates, `(index, weight)` in the order the rule scans them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadRule {
    pub measure: LoadMeasure,
    pub candidates: Vec<(u32, u32)>,
}

impl LoadRule {
    /// The first-try candidates of `backends` (the healthy ones, or all when none is), with
    /// their weights.
    pub fn over(backends: &Backends, measure: LoadMeasure) -> Self {
        let candidates = backends.candidates(&[]);
        Self {
            measure,
            candidates: candidates
                .iter()
                .map(|i| (i, u32::try_from(backends.weight(i)).unwrap_or(u32::MAX)))
                .collect(),
        }
    }
}

/// Which number of a pick indexes a [`PickTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableIndex {
    /// The route's pick sequence: the table is a cycle.
    Sequence,
    /// The pick's random bits: every entry is equally likely.
    Entropy,
}

/// First-try picks written out: the pick for number `x` is `entries[x % entries.len()]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickTable {
    pub index: TableIndex,
    pub entries: Vec<u32>,
}

impl PickTable {
    /// The most entries the host accepts.
    pub const MAX_ENTRIES: usize = 65_536;

    /// A table of `entries`; none if it is longer than the host accepts.
    pub fn new(index: TableIndex, entries: Vec<u32>) -> Option<Self> {
        (entries.len() <= Self::MAX_ENTRIES).then_some(Self { index, entries })
    }

    /// Each candidate as many times as its weight, so that a uniformly chosen entry picks in
    /// proportion to weight; none if that is longer than the host accepts.
    pub fn weighted(index: TableIndex, candidates: &Candidates<'_>) -> Option<Self> {
        if candidates.total_weight() > Self::MAX_ENTRIES as u64 {
            return None;
        }
        let backends = candidates.backends();
        let entries = candidates
            .iter()
            .flat_map(|i| std::iter::repeat_n(i, backends.weight(i) as usize))
            .collect();
        Self::new(index, entries)
    }
}
