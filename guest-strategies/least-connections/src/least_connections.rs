//! Least connections: the candidate with the fewest in-flight connections or requests per unit
//! of weight, read live from the host.
//!
//! The host keeps the counts and shares them across worker threads, so the choice is correct
//! under concurrency: two workers see each other's connections, which per-worker counts in the
//! guest could not. Loads are compared as `in_flight / weight` by cross-multiplying, so a
//! weight-3 backend carries three times the connections of a weight-1 one before they tie.
//!
//! Ties (an idle route ties everywhere) are broken by starting the scan at `sequence % len`, so
//! tied backends take turns instead of the first one taking every new connection.
//!
//! The scan is exactly the contract's `least-loaded` plan, so the strategy hands it to the host
//! when the backends change, and the host scans its own counters for first tries without a
//! guest call; `pick` still serves retries, which exclude backends.

use harbor_strategy_common::{
    Algorithm, Backends, Load, LoadMeasure, LoadRule, PickPlan, PickRequest,
};

pub struct LeastConnections {
    backends: Backends,
}

impl Algorithm for LeastConnections {
    const NAME: &'static str = "least-connections";

    type Settings = ();

    fn new(backends: Backends, _settings: &()) -> Self {
        Self { backends }
    }

    fn pick(&mut self, request: &PickRequest, load: &impl Load) -> Option<u32> {
        let candidates = self.backends.candidates(request.exclude);
        let len = u64::try_from(candidates.len()).ok().filter(|&n| n > 0)?;
        let start = usize::try_from(request.sequence % len).ok()?;
        let rotated = candidates
            .iter()
            .skip(start)
            .chain(candidates.iter().take(start));
        // (index, in flight, weight). Both are at most `u32::MAX`, so their cross products fit
        // in a u64 and the comparison is exact without 128-bit arithmetic (slow in wasm).
        let mut best: Option<(u32, u64, u64)> = None;
        for i in rotated {
            let in_flight = u64::from(load.in_flight(i));
            let weight = self.backends.weight(i);
            let better = best.is_none_or(|(_, best_load, best_weight)| {
                in_flight * best_weight < best_load * weight
            });
            if better {
                best = Some((i, in_flight, weight));
            }
        }
        best.map(|(i, _, _)| i)
    }

    /// The same scan as `pick`, which the host runs natively for first tries.
    fn plan(&mut self) -> Option<PickPlan> {
        Some(PickPlan::LeastLoaded(LoadRule::over(
            &self.backends,
            LoadMeasure::InFlight,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harbor_strategy_common::Backend;
    use harbor_strategy_common::load::FixedLoad;

    fn backends(spec: &[(u32, bool)]) -> Backends {
        spec.iter()
            .enumerate()
            .map(|(i, &(weight, healthy))| Backend::new(format!("10.0.0.{i}:80"), weight, healthy))
            .collect()
    }

    fn pick(
        lc: &mut LeastConnections,
        sequence: u64,
        exclude: &[u32],
        load: &FixedLoad,
    ) -> Option<u32> {
        lc.pick(
            &PickRequest {
                sequence,
                exclude,
                ..Default::default()
            },
            load,
        )
    }

    /// Picks `n` connections that stay open, the host counting each one as in flight.
    fn open(lc: &mut LeastConnections, n: u64, load: &mut FixedLoad) {
        load.in_flight.resize(lc.backends.len(), 0);
        for sequence in 0..n {
            let i = pick(lc, sequence, &[], load).expect("a candidate");
            load.in_flight[i as usize] += 1;
        }
    }

    #[test]
    fn picks_the_fewest_in_flight() {
        let mut lc = LeastConnections::new(backends(&[(1, true), (1, true), (1, true)]), &());
        let load = FixedLoad::with_in_flight([5, 2, 7]);
        assert!((0..10).all(|s| pick(&mut lc, s, &[], &load) == Some(1)));
    }

    #[test]
    fn ties_take_turns() {
        let mut lc =
            LeastConnections::new(backends(&[(1, true), (1, true), (1, true), (1, true)]), &());
        let load = FixedLoad::with_in_flight([1, 0, 1, 0]);
        let got: Vec<_> = (0..4).map(|s| pick(&mut lc, s, &[], &load)).collect();
        assert_eq!(got, [1, 1, 3, 3].map(Some));
        let idle = FixedLoad::default();
        let got: Vec<_> = (0..5).map(|s| pick(&mut lc, s, &[], &idle)).collect();
        assert_eq!(got, [0, 1, 2, 3, 0].map(Some));
    }

    #[test]
    fn load_is_weighed() {
        let mut lc = LeastConnections::new(backends(&[(3, true), (1, true)]), &());
        // 2/3 < 1/1.
        assert_eq!(
            pick(&mut lc, 0, &[], &FixedLoad::with_in_flight([2, 1])),
            Some(0)
        );
        // 4/3 > 1/1.
        assert_eq!(
            pick(&mut lc, 0, &[], &FixedLoad::with_in_flight([4, 1])),
            Some(1)
        );
        let mut load = FixedLoad::default();
        open(&mut lc, 400, &mut load);
        assert_eq!(load.in_flight, [300, 100]);
    }

    #[test]
    fn open_connections_spread_evenly() {
        let mut lc = LeastConnections::new(backends(&[(1, true); 5]), &());
        let mut load = FixedLoad::with_in_flight([10, 0, 0, 0, 0]);
        open(&mut lc, 40, &mut load);
        assert_eq!(
            load.in_flight, [10; 5],
            "the busy backend waited for the rest"
        );
    }

    #[test]
    fn skips_unhealthy_and_excluded() {
        let mut lc = LeastConnections::new(backends(&[(1, true), (1, false), (1, true)]), &());
        let load = FixedLoad::with_in_flight([3, 0, 1]);
        assert_eq!(pick(&mut lc, 0, &[], &load), Some(2));
        assert_eq!(pick(&mut lc, 0, &[2], &load), Some(0));
        assert_eq!(
            pick(&mut lc, 0, &[0, 2], &load),
            Some(1),
            "falls back to unhealthy"
        );
        assert_eq!(pick(&mut lc, 0, &[0, 1, 2], &load), None);
    }

    #[test]
    fn balances_over_all_when_none_is_healthy() {
        let mut lc = LeastConnections::new(backends(&[(1, false), (1, false)]), &());
        assert_eq!(
            pick(&mut lc, 0, &[], &FixedLoad::with_in_flight([4, 2])),
            Some(1)
        );
    }

    #[test]
    fn follows_backends_joining_and_leaving() {
        let mut lc = LeastConnections::new(backends(&[]), &());
        assert_eq!(pick(&mut lc, 0, &[], &FixedLoad::default()), None);
        lc.rebuild(backends(&[(1, true), (1, true)]), &());
        let mut load = FixedLoad::default();
        open(&mut lc, 10, &mut load);
        assert_eq!(load.in_flight, [5, 5]);
        // A new backend takes every new connection until it catches up.
        lc.rebuild(backends(&[(1, true), (1, true), (1, true)]), &());
        load.in_flight.push(0);
        let got: Vec<_> = (0..5).map(|s| pick(&mut lc, s, &[], &load)).collect();
        assert_eq!(got, [2; 5].map(Some));
        open(&mut lc, 5, &mut load);
        assert_eq!(load.in_flight, [5, 5, 5]);
        lc.rebuild(backends(&[(1, true), (1, false), (1, true)]), &());
        open(&mut lc, 4, &mut load);
        assert_eq!(load.in_flight, [7, 5, 7]);
    }
}
