//! nginx's smooth weighted round-robin.
//!
//! Every pick adds each candidate's weight to its running value, takes the candidate with the
//! largest value and subtracts the candidates' total weight from it. Over any window of
//! `total` picks each backend gets exactly its weight's share, and a heavy backend's turns are
//! spread out (5:1:1 gives `a a b a c a a`, not `a a a a a b c`).
//!
//! The running values live in the balancer, so each worker thread's balancer interleaves on its
//! own; shares still hold per worker and therefore overall. They are carried across rebuilds by
//! address, so a health flap or a backend joining does not restart every backend's turn.

use std::collections::HashMap;

use harbor_strategy_common::{
    Algorithm, Backends, Load, PickPlan, PickRequest, PickTable, TableIndex,
};

pub struct SmoothWeighted {
    backends: Backends,
    /// Running value per backend index.
    current: Vec<i64>,
}

impl Algorithm for SmoothWeighted {
    const NAME: &'static str = "weighted-round-robin";

    type Settings = ();

    fn new(backends: Backends, _settings: &()) -> Self {
        let current = vec![0; backends.len()];
        Self { backends, current }
    }

    fn rebuild(&mut self, backends: Backends, _settings: &()) {
        let carried: HashMap<&str, i64> = self
            .backends
            .as_slice()
            .iter()
            .zip(&self.current)
            .map(|(b, &value)| (b.address.as_str(), value))
            .collect();
        let current = backends
            .as_slice()
            .iter()
            .map(|b| carried.get(b.address.as_str()).copied().unwrap_or(0))
            .collect();
        self.current = current;
        self.backends = backends;
    }

    fn pick(&mut self, request: &PickRequest, _load: &impl Load) -> Option<u32> {
        let candidates = self.backends.candidates(request.exclude);
        let total = i64::try_from(candidates.total_weight()).ok()?;
        let mut best: Option<(u32, i64)> = None;
        for i in candidates.iter() {
            let weight = i64::try_from(self.backends.weight(i)).ok()?;
            let value = self.current.get_mut(i as usize)?;
            *value += weight;
            // Strictly greater: ties go to the earlier backend, as in nginx.
            if best.is_none_or(|(_, top)| *value > top) {
                best = Some((i, *value));
            }
        }
        let (chosen, _) = best?;
        if let Some(value) = self.current.get_mut(chosen as usize) {
            *value -= total;
        }
        Some(chosen)
    }

    fn plan(&mut self) -> Option<PickPlan> {
        self.table().map(PickPlan::Table)
    }
}

impl SmoothWeighted {
    /// The next full cycle, indexed by sequence. Smooth weighted round-robin repeats itself
    /// after as many picks as the weights add up to (each backend is picked its weight's number
    /// of times and its counter returns to where it started), so the cycle is every pick to
    /// come; the counters themselves are left as they were.
    pub fn table(&mut self) -> Option<PickTable> {
        let total = self.backends.candidates(&[]).total_weight();
        if total > PickTable::MAX_ENTRIES as u64 {
            return None;
        }
        let saved = self.current.clone();
        let request = PickRequest::default();
        let no_load = harbor_strategy_common::load::FixedLoad::default();
        let entries: Option<Vec<u32>> = (0..total).map(|_| self.pick(&request, &no_load)).collect();
        self.current = saved;
        PickTable::new(TableIndex::Sequence, entries?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harbor_strategy_common::Backend;
    use harbor_strategy_common::load::FixedLoad;

    fn backends(spec: &[(&str, u32, bool)]) -> Backends {
        spec.iter()
            .map(|&(address, weight, healthy)| Backend::new(address, weight, healthy))
            .collect()
    }

    fn pick(wrr: &mut SmoothWeighted, exclude: &[u32]) -> Option<u32> {
        wrr.pick(
            &PickRequest {
                exclude,
                ..Default::default()
            },
            &FixedLoad::default(),
        )
    }

    fn counts(wrr: &mut SmoothWeighted, picks: usize, slots: usize) -> Vec<usize> {
        let mut counts = vec![0; slots];
        for _ in 0..picks {
            counts[pick(wrr, &[]).expect("a candidate") as usize] += 1;
        }
        counts
    }

    #[test]
    fn the_table_is_the_next_cycle_and_leaves_the_counters_alone() {
        let mut wrr = SmoothWeighted::new(
            backends(&[("a", 5, true), ("b", 1, true), ("c", 1, true)]),
            &(),
        );
        pick(&mut wrr, &[]);
        let table = wrr.table().expect("a table");
        assert_eq!(table.index, TableIndex::Sequence);
        assert_eq!(table.entries.len(), 7);
        // Asking for the table did not advance the counters: the picks that follow are its
        // entries, and the cycle then repeats.
        let picks: Vec<u32> = (0..14).map(|_| pick(&mut wrr, &[]).unwrap()).collect();
        assert_eq!(picks[..7], table.entries[..]);
        assert_eq!(picks[7..], table.entries[..]);
        // Unhealthy backends are left out; too long a cycle means no table.
        let mut wrr = SmoothWeighted::new(backends(&[("a", 2, true), ("b", 3, false)]), &());
        assert_eq!(wrr.table().unwrap().entries, vec![0, 0]);
        let mut wrr = SmoothWeighted::new(backends(&[("a", 10_000, true); 8]), &());
        assert!(wrr.table().is_none());
    }

    #[test]
    fn interleaves_like_nginx() {
        let mut wrr = SmoothWeighted::new(
            backends(&[("a", 5, true), ("b", 1, true), ("c", 1, true)]),
            &(),
        );
        let order: Vec<_> = (0..7)
            .map(|_| pick(&mut wrr, &[]).expect("a candidate"))
            .collect();
        assert_eq!(order, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn honours_weights_within_one_percent() {
        let weights = [1, 3, 7, 10, 29, 50];
        let spec: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (["a", "b", "c", "d", "e", "f"][i], w, true))
            .collect();
        let mut wrr = SmoothWeighted::new(backends(&spec), &());
        let total: u32 = weights.iter().sum();
        let picks = 100_003;
        let got = counts(&mut wrr, picks, weights.len());
        for (i, &w) in weights.iter().enumerate() {
            let want = picks as f64 * f64::from(w) / f64::from(total);
            let error = (got[i] as f64 - want).abs() / want;
            assert!(
                error < 0.01,
                "backend {i}: {} picks, want {want:.0}",
                got[i]
            );
        }
    }

    #[test]
    fn skips_unhealthy_and_excluded() {
        let mut wrr = SmoothWeighted::new(
            backends(&[("a", 2, true), ("b", 1, false), ("c", 1, true)]),
            &(),
        );
        assert_eq!(counts(&mut wrr, 300, 3), [200, 0, 100]);
        for _ in 0..10 {
            assert_eq!(pick(&mut wrr, &[0]), Some(2));
        }
        assert_eq!(pick(&mut wrr, &[0, 2]), Some(1), "falls back to unhealthy");
        assert_eq!(pick(&mut wrr, &[0, 1, 2]), None);
    }

    #[test]
    fn balances_over_all_when_none_is_healthy() {
        let mut wrr = SmoothWeighted::new(backends(&[("a", 1, false), ("b", 3, false)]), &());
        assert_eq!(counts(&mut wrr, 400, 2), [100, 300]);
    }

    #[test]
    fn nothing_to_pick_without_backends() {
        assert_eq!(
            pick(&mut SmoothWeighted::new(Backends::default(), &()), &[]),
            None
        );
    }

    #[test]
    fn shares_follow_backends_joining_leaving_and_reweighting() {
        let mut wrr = SmoothWeighted::new(backends(&[("a", 1, true), ("b", 1, true)]), &());
        assert_eq!(counts(&mut wrr, 100, 2), [50, 50]);
        wrr.rebuild(
            backends(&[("a", 1, true), ("b", 1, true), ("c", 2, true)]),
            &(),
        );
        assert_eq!(counts(&mut wrr, 400, 3), [100, 100, 200]);
        wrr.rebuild(backends(&[("c", 2, true), ("a", 1, true)]), &());
        assert_eq!(
            counts(&mut wrr, 300, 2),
            [200, 100],
            "indexes moved with b gone"
        );
        wrr.rebuild(backends(&[("c", 2, false), ("a", 1, true)]), &());
        assert_eq!(counts(&mut wrr, 10, 2), [0, 10]);
        wrr.rebuild(backends(&[("c", 1, true), ("a", 3, true)]), &());
        assert_eq!(counts(&mut wrr, 400, 2), [100, 300]);
    }

    #[test]
    fn running_values_survive_a_health_flap() {
        let spec = [("a", 1, true), ("b", 1, true)];
        let mut wrr = SmoothWeighted::new(backends(&spec), &());
        assert_eq!(pick(&mut wrr, &[]), Some(0));
        wrr.rebuild(backends(&spec), &());
        assert_eq!(pick(&mut wrr, &[]), Some(1), "b's turn is not forgotten");
    }
}
