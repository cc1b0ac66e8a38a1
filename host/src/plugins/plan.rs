//! Pick plans: how the host answers a route's first tries natively, the way the strategy said when
//! it was given the backends, instead of calling the guest per pick (a component call costs more
//! than the whole pick should: see host/benches/README.md, Strategy pick cost). A table answers by
//! one number of the pick; a load rule compares the live load of the candidates the strategy
//! chose, read from the host's own counters. The contract (`pick-plan` in `wit/strategy`) defines
//! each rule exactly, so a strategy's own `pick` can make the same choices for the retries the
//! plan does not answer.

use std::cmp::Ordering;
use std::sync::Arc;

use super::guest::{self, LoadMeasure, TableIndex};
use super::load::{BackendLoad, LoadTable};
use super::report::FaultKind;
use super::shard::{Ask, Fault};

/// Longest pick table, and most load-rule candidates, accepted (the contract's limit).
const MAX_ENTRIES: usize = 65_536;
/// Largest weight a load-rule candidate may have (the contract's).
const MAX_WEIGHT: u32 = 10_000;

/// A guest's plan, checked against the backend set it was made for.
pub(super) enum Plan {
    Table(Table),
    LeastLoaded(LoadRule),
    TwoChoices(LoadRule),
}

pub(super) struct Table {
    index: TableIndex,
    entries: Box<[u32]>,
}

pub(super) struct LoadRule {
    measure: LoadMeasure,
    candidates: Box<[Candidate]>,
    /// Whether every candidate has the same weight: loads then compare without multiplying.
    equal_weights: bool,
    /// Running sums of the candidates' weights, each including its own: weighted draws search
    /// it.
    ends: Box<[u64]>,
}

struct Candidate {
    index: u32,
    weight: u64,
    /// The backend's counters themselves, so a pick reads them without indexing the set.
    load: Arc<BackendLoad>,
}

fn bad(message: String) -> Fault {
    Fault {
        kind: FaultKind::BadAnswer,
        message,
    }
}

impl Plan {
    /// Checks that `plan` names only backends of `loads` (the set's counters, in its order),
    /// with weights in range and within the size limit.
    pub(super) fn check(plan: guest::PickPlan, loads: &LoadTable) -> Result<Self, Fault> {
        let backends = loads.len();
        let check_index = |i: u32| {
            if i as usize >= backends {
                Err(bad(format!("a pick plan names backend {i} of {backends}")))
            } else {
                Ok(())
            }
        };
        let check_len = |what: &str, len: usize| {
            if len > MAX_ENTRIES {
                Err(bad(format!(
                    "a pick {what} of {len} entries; at most {MAX_ENTRIES} are allowed"
                )))
            } else {
                Ok(())
            }
        };
        let rule = |rule: guest::LoadRule| -> Result<LoadRule, Fault> {
            check_len("rule", rule.candidates.len())?;
            let mut sum = 0;
            let mut candidates = Vec::with_capacity(rule.candidates.len());
            let mut ends = Vec::with_capacity(rule.candidates.len());
            for c in rule.candidates {
                check_index(c.index)?;
                if !(1..=MAX_WEIGHT).contains(&c.weight) {
                    return Err(bad(format!(
                        "a pick rule gives backend {} weight {}; weights run from 1 to {MAX_WEIGHT}",
                        c.index, c.weight
                    )));
                }
                sum += u64::from(c.weight);
                ends.push(sum);
                candidates.push(Candidate {
                    index: c.index,
                    weight: u64::from(c.weight),
                    load: loads.get(c.index as usize).cloned().unwrap_or_default(),
                });
            }
            let equal_weights = candidates.windows(2).all(|w| w[0].weight == w[1].weight);
            Ok(LoadRule {
                measure: rule.measure,
                equal_weights,
                candidates: candidates.into_boxed_slice(),
                ends: ends.into_boxed_slice(),
            })
        };
        Ok(match plan {
            guest::PickPlan::Table(table) => {
                check_len("table", table.entries.len())?;
                table.entries.iter().try_for_each(|&i| check_index(i))?;
                Plan::Table(Table {
                    index: table.index,
                    entries: table.entries.into_boxed_slice(),
                })
            }
            guest::PickPlan::LeastLoaded(r) => Plan::LeastLoaded(rule(r)?),
            guest::PickPlan::TwoChoices(r) => Plan::TwoChoices(rule(r)?),
        })
    }

    /// True when the plan can never choose a backend.
    pub(super) fn is_empty(&self) -> bool {
        match self {
            Plan::Table(t) => t.entries.is_empty(),
            Plan::LeastLoaded(r) | Plan::TwoChoices(r) => r.candidates.is_empty(),
        }
    }

    /// The plan's answer to `ask`: `None` when the plan cannot answer it (a hash-key table and
    /// a pick without a key), else the pick (`Some(None)`: no backend can be used).
    #[inline]
    pub(super) fn answer(&self, ask: &Ask<'_>) -> Option<Option<u32>> {
        match self {
            Plan::Table(t) => t.answer(ask),
            Plan::LeastLoaded(r) => Some(r.least_loaded(ask.sequence)),
            Plan::TwoChoices(r) => Some(r.two_choices(ask.entropy)),
        }
    }
}

impl Table {
    #[inline]
    fn answer(&self, ask: &Ask<'_>) -> Option<Option<u32>> {
        let x = match self.index {
            TableIndex::Sequence => ask.sequence,
            TableIndex::Entropy => ask.entropy,
            TableIndex::HashKey => ask.hash_key?,
        };
        let len = self.entries.len() as u64;
        if len == 0 {
            return Some(None);
        }
        // Lossless: the remainder is below the table's length, itself at most MAX_ENTRIES.
        Some(Some(self.entries[(x % len) as usize]))
    }
}

impl LoadRule {
    /// The candidate with the least load per weight, scanning from `sequence % len` and
    /// wrapping; a later candidate must have strictly less to win.
    fn least_loaded(&self, sequence: u64) -> Option<u32> {
        let len = self.candidates.len();
        if len == 0 {
            return None;
        }
        let start = (sequence % len as u64) as usize;
        let (before, from) = self.candidates.split_at(start);
        match self.measure {
            LoadMeasure::InFlight if self.equal_weights => {
                // Nothing is less than an idle candidate, so the scan stops at the first one: an
                // idle route costs one read.
                let mut best = (&from[0], from[0].load.in_flight());
                for half in [&from[1..], before] {
                    for c in half {
                        if best.1 == 0 {
                            return Some(best.0.index);
                        }
                        let load = c.load.in_flight();
                        if load < best.1 {
                            best = (c, load);
                        }
                    }
                }
                Some(best.0.index)
            }
            LoadMeasure::InFlight => {
                // In flight times weight fits a u64 (u32 × 10,000).
                let mut best = (&from[0], u64::from(from[0].load.in_flight()));
                for half in [&from[1..], before] {
                    for c in half {
                        if best.1 == 0 {
                            return Some(best.0.index);
                        }
                        let load = u64::from(c.load.in_flight());
                        if load * best.0.weight < best.1 * c.weight {
                            best = (c, load);
                        }
                    }
                }
                Some(best.0.index)
            }
            LoadMeasure::PeakEwma(unmeasured) => {
                let mut best = &from[0];
                let mut best_cost = peak_ewma_cost(best, unmeasured);
                for c in from[1..].iter().chain(before) {
                    let cost = peak_ewma_cost(c, unmeasured);
                    if cmp_per_weight(cost, c.weight, best_cost, best.weight).is_lt() {
                        best = c;
                        best_cost = cost;
                    }
                }
                Some(best.index)
            }
        }
    }

    /// Two distinct candidates drawn in proportion to weight, the second among the others; the
    /// second wins only with strictly less load per weight.
    fn two_choices(&self, entropy: u64) -> Option<u32> {
        let total = *self.ends.last()?;
        let first = self.position_of(uniform(entropy, total));
        let a = &self.candidates[first];
        if self.candidates.len() < 2 {
            return Some(a.index);
        }
        let mut point = uniform(mix64(entropy), total - a.weight);
        // The first draw's stretch of the weight line is cut out: points from its start on
        // belong to the candidates after it.
        if point >= self.ends[first] - a.weight {
            point += a.weight;
        }
        let b = &self.candidates[self.position_of(point)];
        let (cost_a, cost_b) = match self.measure {
            LoadMeasure::InFlight => (
                u128::from(a.load.in_flight()),
                u128::from(b.load.in_flight()),
            ),
            LoadMeasure::PeakEwma(unmeasured) => {
                (peak_ewma_cost(a, unmeasured), peak_ewma_cost(b, unmeasured))
            }
        };
        Some(
            if cmp_per_weight(cost_b, b.weight, cost_a, a.weight).is_lt() {
                b.index
            } else {
                a.index
            },
        )
    }

    /// The position of the candidate whose stretch of `0..total` holds `point`.
    fn position_of(&self, point: u64) -> usize {
        self.ends
            .partition_point(|&end| end <= point)
            .min(self.candidates.len() - 1)
    }
}

fn peak_ewma_cost(c: &Candidate, unmeasured_ns: u64) -> u128 {
    let latency = match c.load.latency_ewma_ns() {
        0 => unmeasured_ns,
        measured => measured,
    };
    u128::from(latency) * (u128::from(c.load.in_flight()) + 1)
}

/// `cost_a / weight_a` against `cost_b / weight_b`, exactly, by cross-multiplying (the costs
/// are at most a u64 times a u32 plus one and the weights at most 10,000, so the products
/// cannot saturate in practice).
fn cmp_per_weight(cost_a: u128, weight_a: u64, cost_b: u128, weight_b: u64) -> Ordering {
    cost_a
        .saturating_mul(u128::from(weight_b))
        .cmp(&cost_b.saturating_mul(u128::from(weight_a)))
}

/// SplitMix64's finalizer: the contract derives the second draw's bits from the pick's entropy
/// with it.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// 64 random bits mapped to `0..n` by multiply-high.
fn uniform(bits: u64, n: u64) -> u64 {
    ((u128::from(bits) * u128::from(n)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Backends with these in-flight counts (held by the guards returned) and latencies.
    fn loads(in_flight: &[u32], latency_ms: &[u64]) -> (LoadTable, Vec<super::super::InFlight>) {
        let mut held = Vec::new();
        let entries = in_flight
            .iter()
            .zip(latency_ms)
            .map(|(&n, &ms)| {
                let load = Arc::new(BackendLoad::default());
                held.extend((0..n).map(|_| load.start()));
                if ms > 0 {
                    load.observe(Duration::from_millis(ms));
                }
                load
            })
            .collect();
        (LoadTable::new(entries), held)
    }

    fn rule(measure: LoadMeasure, candidates: &[(u32, u32)]) -> guest::LoadRule {
        guest::LoadRule {
            measure,
            candidates: candidates
                .iter()
                .map(|&(index, weight)| guest::WeightedCandidate { index, weight })
                .collect(),
        }
    }

    fn ask(sequence: u64) -> Ask<'static> {
        Ask {
            sequence,
            entropy: 0,
            hash_key: None,
            exclude: &[],
        }
    }

    #[test]
    fn least_loaded_by_peak_ewma_weighs_latency_by_queue_and_unmeasured_backends() {
        // Costs: 10 ms × 3, 40 ms × 1, unmeasured (20 ms) × 2.
        let (table, _held) = loads(&[2, 0, 1], &[10, 40, 0]);
        let measure = LoadMeasure::PeakEwma(20_000_000);
        let plan = Plan::check(
            guest::PickPlan::LeastLoaded(rule(measure, &[(0, 1), (1, 1), (2, 1)])),
            &table,
        )
        .expect("a valid plan");
        assert!((0..6).all(|s| plan.answer(&ask(s)) == Some(Some(0))));
        // Weight 3 on backend 2 makes its cost per weight the least: 40 / 3.
        let plan = Plan::check(
            guest::PickPlan::LeastLoaded(rule(measure, &[(0, 1), (1, 1), (2, 3)])),
            &table,
        )
        .expect("a valid plan");
        assert!((0..6).all(|s| plan.answer(&ask(s)) == Some(Some(2))));
    }

    #[test]
    fn plans_naming_unknown_backends_or_bad_weights_are_refused() {
        let (table, _held) = loads(&[0, 0], &[0, 0]);
        let refused = |plan| Plan::check(plan, &table).err().map(|f| f.message);
        let in_flight = LoadMeasure::InFlight;
        assert_eq!(
            refused(guest::PickPlan::TwoChoices(rule(
                in_flight,
                &[(0, 1), (2, 1)]
            ))),
            Some("a pick plan names backend 2 of 2".into())
        );
        let heavy = refused(guest::PickPlan::LeastLoaded(rule(
            in_flight,
            &[(1, 10_001)],
        )));
        assert!(heavy.is_some_and(|m| m.contains("weight 10001")));
        let empty = Plan::check(guest::PickPlan::LeastLoaded(rule(in_flight, &[])), &table)
            .expect("an empty rule is valid");
        assert!(empty.is_empty());
        assert_eq!(empty.answer(&ask(0)), Some(None), "no backend can be used");
    }
}
