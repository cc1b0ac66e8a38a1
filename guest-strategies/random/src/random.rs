//! Weighted random: each pick draws a candidate with probability proportional to its weight,
//! from the host's fresh `entropy` (strategies have no random source of their own).
//!
//! Stateless, so workers need no coordination and a rebuild forgets nothing. Without retries a
//! pick is a binary search over precomputed running weights.

use harbor_strategy_common::{
    Algorithm, Backends, Load, PickPlan, PickRequest, PickTable, TableIndex,
};

pub struct WeightedRandom {
    backends: Backends,
}

impl Algorithm for WeightedRandom {
    const NAME: &'static str = "random";

    type Settings = ();

    fn new(backends: Backends, _settings: &()) -> Self {
        Self { backends }
    }

    fn pick(&mut self, request: &PickRequest, _load: &impl Load) -> Option<u32> {
        self.backends
            .candidates(request.exclude)
            .random(request.entropy)
    }

    fn plan(&mut self) -> Option<PickPlan> {
        self.table().map(PickPlan::Table)
    }
}

impl WeightedRandom {
    /// Each candidate as often as its weight, indexed by entropy: the same odds as above.
    pub fn table(&mut self) -> Option<PickTable> {
        PickTable::weighted(TableIndex::Entropy, &self.backends.candidates(&[]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harbor_strategy_common::Backend;
    use harbor_strategy_common::hash::mix64;
    use harbor_strategy_common::load::FixedLoad;

    fn backends(spec: &[(u32, bool)]) -> Backends {
        spec.iter()
            .enumerate()
            .map(|(i, &(weight, healthy))| Backend::new(format!("10.0.0.{i}:80"), weight, healthy))
            .collect()
    }

    fn shares(random: &mut WeightedRandom, exclude: &[u32], slots: usize) -> Vec<f64> {
        let picks = 200_000;
        let mut counts = vec![0u32; slots];
        for n in 0..picks {
            let request = PickRequest {
                entropy: mix64(n),
                exclude,
                ..Default::default()
            };
            counts[random
                .pick(&request, &FixedLoad::default())
                .expect("a candidate") as usize] += 1;
        }
        counts
            .iter()
            .map(|&c| f64::from(c) / picks as f64)
            .collect()
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() < 0.01,
                "backend {i}: share {g:.4}, want {w:.4}"
            );
        }
    }

    #[test]
    fn shares_follow_weights() {
        let mut random =
            WeightedRandom::new(backends(&[(1, true), (1, true), (2, true), (4, true)]), &());
        assert_close(&shares(&mut random, &[], 4), &[0.125, 0.125, 0.25, 0.5]);
    }

    #[test]
    fn skips_unhealthy_and_excluded() {
        let mut random = WeightedRandom::new(
            backends(&[(1, true), (1, false), (2, true), (1, true)]),
            &(),
        );
        assert_close(&shares(&mut random, &[], 4), &[0.25, 0.0, 0.5, 0.25]);
        assert_close(&shares(&mut random, &[2], 4), &[0.5, 0.0, 0.0, 0.5]);
    }

    #[test]
    fn balances_over_all_when_none_is_healthy() {
        let mut random = WeightedRandom::new(backends(&[(1, false), (3, false)]), &());
        assert_close(&shares(&mut random, &[], 2), &[0.25, 0.75]);
        let mut random = WeightedRandom::new(backends(&[(1, true), (3, false)]), &());
        assert_close(&shares(&mut random, &[0], 2), &[0.0, 1.0]);
    }

    #[test]
    fn nothing_to_pick_when_empty_or_all_excluded() {
        let request = PickRequest::default();
        assert_eq!(
            WeightedRandom::new(backends(&[]), &()).pick(&request, &FixedLoad::default()),
            None
        );
        let request = PickRequest {
            exclude: &[0],
            ..request
        };
        assert_eq!(
            WeightedRandom::new(backends(&[(1, true)]), &()).pick(&request, &FixedLoad::default()),
            None
        );
    }

    #[test]
    fn shares_follow_backends_joining_and_leaving() {
        let mut random = WeightedRandom::new(backends(&[(1, true), (1, true)]), &());
        assert_close(&shares(&mut random, &[], 2), &[0.5, 0.5]);
        random.rebuild(backends(&[(1, true), (1, true), (2, true)]), &());
        assert_close(&shares(&mut random, &[], 3), &[0.25, 0.25, 0.5]);
        random.rebuild(backends(&[(1, true), (1, false), (2, true)]), &());
        assert_close(&shares(&mut random, &[], 3), &[1.0 / 3.0, 0.0, 2.0 / 3.0]);
        random.rebuild(backends(&[(2, true)]), &());
        assert_close(&shares(&mut random, &[], 1), &[1.0]);
    }

    #[test]
    fn extreme_entropy_stays_in_range() {
        let mut random = WeightedRandom::new(backends(&[(1, true), (10_000, true)]), &());
        for entropy in [0, 1, u64::MAX - 1, u64::MAX] {
            let request = PickRequest {
                entropy,
                ..Default::default()
            };
            assert!(random.pick(&request, &FixedLoad::default()).is_some());
        }
    }
}
