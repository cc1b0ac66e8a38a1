//! Round-robin: candidates in turn, by the host's pick counter.
//!
//! The counter is shared by every worker thread, so `sequence % candidates` cycles exactly across
//! the whole route with no state here; a per-balancer counter would cycle per worker and send
//! bursts to the same backend from each. Weights are ignored (that is `weighted-round-robin`).

use harbor_strategy_common::{
    Algorithm, Backends, Load, PickPlan, PickRequest, PickTable, TableIndex,
};

pub struct RoundRobin {
    backends: Backends,
}

impl Algorithm for RoundRobin {
    const NAME: &'static str = "round-robin";

    type Settings = ();

    fn new(backends: Backends, _settings: &()) -> Self {
        Self { backends }
    }

    fn pick(&mut self, request: &PickRequest, _load: &impl Load) -> Option<u32> {
        let candidates = self.backends.candidates(request.exclude);
        let len = u64::try_from(candidates.len()).ok().filter(|&n| n > 0)?;
        let turn = usize::try_from(request.sequence % len).ok()?;
        candidates.nth(turn)
    }

    fn plan(&mut self) -> Option<PickPlan> {
        self.table().map(PickPlan::Table)
    }
}

impl RoundRobin {
    /// The candidates in order, indexed by sequence: exactly the picks above.
    pub fn table(&mut self) -> Option<PickTable> {
        let candidates = self.backends.candidates(&[]);
        PickTable::new(TableIndex::Sequence, candidates.iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harbor_strategy_common::Backend;
    use harbor_strategy_common::load::FixedLoad;

    fn backends(health: &[bool]) -> Backends {
        health
            .iter()
            .enumerate()
            .map(|(i, &healthy)| Backend::new(format!("10.0.0.{i}:80"), 1 + i as u32, healthy))
            .collect()
    }

    fn picks(rr: &mut RoundRobin, from: u64, count: u64, exclude: &[u32]) -> Vec<Option<u32>> {
        (0..count)
            .map(|k| {
                let sequence = from.wrapping_add(k);
                rr.pick(
                    &PickRequest {
                        sequence,
                        exclude,
                        ..Default::default()
                    },
                    &FixedLoad::default(),
                )
            })
            .collect()
    }

    #[test]
    fn the_table_cycles_like_the_picks() {
        let mut rr = RoundRobin::new(backends(&[true, false, true, true]), &());
        let table = rr.table().expect("a table");
        assert_eq!(table.index, TableIndex::Sequence);
        assert_eq!(table.entries, vec![0, 2, 3]);
        for sequence in 0..9u64 {
            let request = PickRequest {
                sequence,
                ..Default::default()
            };
            let picked = rr.pick(&request, &FixedLoad::default());
            assert_eq!(picked, Some(table.entries[(sequence % 3) as usize]));
        }
    }

    #[test]
    fn cycles_exactly_ignoring_weights() {
        let mut rr = RoundRobin::new(backends(&[true, true, true]), &());
        let got = picks(&mut rr, 0, 7, &[]);
        let want = [0, 1, 2, 0, 1, 2, 0].map(Some);
        assert_eq!(got, want);
    }

    #[test]
    fn skips_unhealthy_and_excluded() {
        let mut rr = RoundRobin::new(backends(&[true, false, true, true]), &());
        assert_eq!(picks(&mut rr, 0, 6, &[]), [0, 2, 3, 0, 2, 3].map(Some));
        assert_eq!(picks(&mut rr, 0, 4, &[2]), [0, 3, 0, 3].map(Some));
    }

    #[test]
    fn with_nothing_healthy_cycles_over_all() {
        let mut rr = RoundRobin::new(backends(&[false, false]), &());
        assert_eq!(picks(&mut rr, 5, 4, &[]), [1, 0, 1, 0].map(Some));
    }

    #[test]
    fn nothing_to_pick_when_empty_or_all_excluded() {
        let mut rr = RoundRobin::new(backends(&[]), &());
        assert_eq!(picks(&mut rr, 0, 1, &[]), [None]);
        let mut rr = RoundRobin::new(backends(&[true, true]), &());
        assert_eq!(picks(&mut rr, 0, 1, &[0, 1]), [None]);
    }

    #[test]
    fn follows_backends_joining_leaving_and_recovering() {
        let mut rr = RoundRobin::new(backends(&[true, true]), &());
        assert_eq!(picks(&mut rr, 0, 2, &[]), [0, 1].map(Some));
        rr.rebuild(backends(&[true, true, true]), &());
        assert_eq!(picks(&mut rr, 0, 3, &[]), [0, 1, 2].map(Some));
        rr.rebuild(backends(&[true, false, true]), &());
        assert_eq!(picks(&mut rr, 0, 4, &[]), [0, 2, 0, 2].map(Some));
        rr.rebuild(backends(&[true]), &());
        assert_eq!(picks(&mut rr, 0, 2, &[]), [0, 0].map(Some));
    }

    #[test]
    fn a_huge_sequence_still_cycles() {
        let mut rr = RoundRobin::new(backends(&[true, true, true]), &());
        assert_eq!(picks(&mut rr, u64::MAX - 1, 2, &[]), [2, 0].map(Some));
    }
}
