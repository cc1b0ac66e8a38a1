//! Least request by the power of two choices (Envoy's `LEAST_REQUEST`): draw two distinct
//! candidates, keep the one with fewer requests in flight per unit of weight.
//!
//! Two random choices avoid both the herd a global minimum causes when load readings lag (every
//! worker sending to the same idle backend at once) and the O(n) scan; they still shrink the
//! worst backend's load exponentially compared with one random choice.
//!
//! The draws are weighted and ties keep the first draw, so an idle route splits in proportion
//! to weight, while under load the comparison drives `in_flight / weight` towards equal.

use harbor_strategy_common::{
    Algorithm, Backends, Load, LoadMeasure, LoadRule, PickPlan, PickRequest,
};

pub struct LeastRequest {
    backends: Backends,
}

impl Algorithm for LeastRequest {
    const NAME: &'static str = "least-request";

    type Settings = ();

    fn new(backends: Backends, _settings: &()) -> Self {
        Self { backends }
    }

    fn pick(&mut self, request: &PickRequest, load: &impl Load) -> Option<u32> {
        self.backends
            .candidates(request.exclude)
            .two_choices(request.entropy, |i| u128::from(load.in_flight(i)))
    }

    /// The contract's `two-choices` plan, which the host draws for first tries.
    fn plan(&mut self) -> Option<PickPlan> {
        Some(PickPlan::TwoChoices(LoadRule::over(
            &self.backends,
            LoadMeasure::InFlight,
        )))
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

    fn pick(lr: &mut LeastRequest, n: u64, exclude: &[u32], load: &FixedLoad) -> Option<u32> {
        let request = PickRequest {
            sequence: n,
            entropy: mix64(n),
            exclude,
            ..Default::default()
        };
        lr.pick(&request, load)
    }

    fn counts(lr: &mut LeastRequest, picks: u64, exclude: &[u32], load: &FixedLoad) -> Vec<u64> {
        let mut counts = vec![0; lr.backends.len()];
        for n in 0..picks {
            counts[pick(lr, n, exclude, load).expect("a candidate") as usize] += 1;
        }
        counts
    }

    #[test]
    fn the_busiest_backend_is_never_picked() {
        let mut lr = LeastRequest::new(backends(&[(1, true); 4]), &());
        let load = FixedLoad::with_in_flight([0, 9, 1, 2]);
        let got = counts(&mut lr, 10_000, &[], &load);
        assert_eq!(got[1], 0);
        // The idle backend wins every pair it is in: 3 of the 6 pairs.
        assert!((4_700..=5_300).contains(&got[0]), "{got:?}");
    }

    #[test]
    fn idle_split_follows_weights() {
        let mut lr = LeastRequest::new(backends(&[(1, true), (2, true), (7, true)]), &());
        let got = counts(&mut lr, 100_000, &[], &FixedLoad::default());
        for (i, share) in [(0, 0.1), (1, 0.2), (2, 0.7)] {
            let got = got[i] as f64 / 100_000.0;
            assert!((got - share).abs() < 0.01, "backend {i}: {got} vs {share}");
        }
    }

    #[test]
    fn load_is_weighed() {
        let mut lr = LeastRequest::new(backends(&[(3, true), (1, true)]), &());
        // Two candidates: every pick compares both. 2/3 < 1/1; 4/3 > 1/1.
        assert_eq!(
            counts(&mut lr, 100, &[], &FixedLoad::with_in_flight([2, 1])),
            [100, 0]
        );
        assert_eq!(
            counts(&mut lr, 100, &[], &FixedLoad::with_in_flight([4, 1])),
            [0, 100]
        );
    }

    #[test]
    fn open_requests_spread_by_weight() {
        let mut lr = LeastRequest::new(backends(&[(1, true), (1, true), (2, true)]), &());
        let mut load = FixedLoad::with_in_flight([0, 0, 0]);
        for n in 0..4_000 {
            let i = pick(&mut lr, n, &[], &load).expect("a candidate");
            load.in_flight[i as usize] += 1;
        }
        let [a, b, c] = [0, 1, 2].map(|i| load.in_flight[i]);
        assert!(
            a.abs_diff(b) <= 20 && (c / 2).abs_diff(a) <= 20,
            "{a} {b} {c}"
        );
    }

    #[test]
    fn skips_unhealthy_and_excluded() {
        let mut lr = LeastRequest::new(
            backends(&[(1, true), (1, false), (1, true), (1, true)]),
            &(),
        );
        let load = FixedLoad::default();
        assert_eq!(counts(&mut lr, 1_000, &[], &load)[1], 0);
        let got = counts(&mut lr, 1_000, &[0, 3], &load);
        assert_eq!(got, [0, 0, 1_000, 0]);
        let got = counts(&mut lr, 1_000, &[0, 2, 3], &load);
        assert_eq!(got, [0, 1_000, 0, 0], "falls back to unhealthy");
        assert_eq!(pick(&mut lr, 0, &[0, 1, 2, 3], &load), None);
    }

    #[test]
    fn balances_over_all_when_none_is_healthy() {
        let mut lr = LeastRequest::new(backends(&[(1, false), (1, false)]), &());
        let got = counts(&mut lr, 100, &[], &FixedLoad::with_in_flight([3, 1]));
        assert_eq!(got, [0, 100]);
    }

    #[test]
    fn follows_backends_joining_and_leaving() {
        let mut lr = LeastRequest::new(backends(&[]), &());
        assert_eq!(pick(&mut lr, 0, &[], &FixedLoad::default()), None);
        lr.rebuild(backends(&[(1, true)]), &());
        assert_eq!(
            counts(&mut lr, 10, &[], &FixedLoad::with_in_flight([9])),
            [10]
        );
        lr.rebuild(backends(&[(1, true), (1, true)]), &());
        let got = counts(&mut lr, 10, &[], &FixedLoad::with_in_flight([9, 0]));
        assert_eq!(got, [0, 10], "the new, idle backend wins");
        lr.rebuild(backends(&[(1, false), (1, true)]), &());
        assert_eq!(counts(&mut lr, 10, &[], &FixedLoad::default()), [0, 10]);
    }
}
