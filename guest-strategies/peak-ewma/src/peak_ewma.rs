//! Peak EWMA (Linkerd's balancer): power of two choices where a backend's cost is its latency
//! EWMA times the requests it would be queued behind, `ewma × (in_flight + 1)`, per unit of
//! weight.
//!
//! The host keeps the EWMA (it sees every response and it survives hot swaps), so the strategy
//! asks for no outcomes. A backend with no measurement yet is assumed to answer in 30 ms, as
//! Linkerd does: low enough that new backends get traffic and a measurement, high enough that
//! they do not take everything from measured fast ones. The `+ 1` makes an idle slow backend
//! still cost more than an idle fast one.

use harbor_strategy_common::config::Settings;
use harbor_strategy_common::{
    Algorithm, Backends, Load, LoadMeasure, LoadRule, PickPlan, PickRequest,
};

/// The latency assumed before the host has measured one.
pub const DEFAULT_RTT_NS: u64 = 30_000_000;
/// The bounds of `unmeasured_latency_ms`: a latency assumed is a guess at a real one.
const UNMEASURED_MS: std::ops::RangeInclusive<u64> = 1..=60_000;

/// A route's settings: `unmeasured_latency_ms`, the latency a backend is assumed to have until
/// one is measured (30 by default). Lower sends new backends more of the first traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unmeasured {
    ns: u64,
}

impl Default for Unmeasured {
    fn default() -> Self {
        Self { ns: DEFAULT_RTT_NS }
    }
}

pub struct PeakEwma {
    backends: Backends,
    unmeasured_ns: u64,
}

impl Algorithm for PeakEwma {
    const NAME: &'static str = "peak-ewma";
    type Settings = Unmeasured;

    fn settings(mut settings: Settings) -> Result<Unmeasured, String> {
        let ms = settings.take_u64("unmeasured_latency_ms")?;
        settings.finish(Self::NAME, &["unmeasured_latency_ms"])?;
        match ms {
            None => Ok(Unmeasured::default()),
            Some(ms) if UNMEASURED_MS.contains(&ms) => Ok(Unmeasured { ns: ms * 1_000_000 }),
            Some(ms) => Err(format!(
                "`unmeasured_latency_ms` must be from {} to {} (30 by default), got {ms}",
                UNMEASURED_MS.start(),
                UNMEASURED_MS.end()
            )),
        }
    }

    fn new(backends: Backends, settings: &Unmeasured) -> Self {
        Self {
            backends,
            unmeasured_ns: settings.ns,
        }
    }

    fn pick(&mut self, request: &PickRequest, load: &impl Load) -> Option<u32> {
        let unmeasured = self.unmeasured_ns;
        self.backends
            .candidates(request.exclude)
            .two_choices(request.entropy, |i| cost(load, i, unmeasured))
    }

    /// The contract's `two-choices` plan with peak EWMA's cost, which the host draws for first
    /// tries.
    fn plan(&mut self) -> Option<PickPlan> {
        let measure = LoadMeasure::PeakEwma {
            unmeasured_ns: self.unmeasured_ns,
        };
        Some(PickPlan::TwoChoices(LoadRule::over(
            &self.backends,
            measure,
        )))
    }
}

fn cost(load: &impl Load, index: u32, unmeasured_ns: u64) -> u128 {
    let rtt = match load.latency_ewma_ns(index) {
        0 => unmeasured_ns,
        measured => measured,
    };
    u128::from(rtt) * (u128::from(load.in_flight(index)) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use harbor_strategy_common::Backend;
    use harbor_strategy_common::hash::mix64;
    use harbor_strategy_common::load::FixedLoad;

    const MS: u64 = 1_000_000;

    fn backends(spec: &[(u32, bool)]) -> Backends {
        spec.iter()
            .enumerate()
            .map(|(i, &(weight, healthy))| Backend::new(format!("10.0.0.{i}:80"), weight, healthy))
            .collect()
    }

    fn load(in_flight: &[u32], latency_ms: &[u64]) -> FixedLoad {
        FixedLoad {
            in_flight: in_flight.to_vec(),
            latency_ewma_ns: latency_ms.iter().map(|ms| ms * MS).collect(),
        }
    }

    fn counts(pe: &mut PeakEwma, picks: u64, exclude: &[u32], load: &FixedLoad) -> Vec<u64> {
        let mut counts = vec![0; pe.backends.len()];
        for n in 0..picks {
            let request = PickRequest {
                sequence: n,
                entropy: mix64(n),
                exclude,
                ..Default::default()
            };
            counts[pe.pick(&request, load).expect("a candidate") as usize] += 1;
        }
        counts
    }

    #[test]
    fn the_faster_backend_wins() {
        let mut pe = PeakEwma::new(backends(&[(1, true), (1, true)]), &Default::default());
        assert_eq!(
            counts(&mut pe, 100, &[], &load(&[0, 0], &[100, 10])),
            [0, 100]
        );
    }

    #[test]
    fn unmeasured_backends_count_as_30_ms() {
        let mut pe = PeakEwma::new(backends(&[(1, true), (1, true)]), &Default::default());
        assert_eq!(
            counts(&mut pe, 100, &[], &load(&[0, 0], &[0, 31])),
            [100, 0]
        );
        assert_eq!(
            counts(&mut pe, 100, &[], &load(&[0, 0], &[0, 29])),
            [0, 100]
        );
    }

    #[test]
    fn the_unmeasured_latency_is_a_setting() {
        let settings = |text: &str| PeakEwma::settings(Settings::parse(text).expect("json"));
        assert_eq!(settings("{}"), Ok(Unmeasured::default()));
        let fast = settings(r#"{"unmeasured_latency_ms": 5}"#).expect("accepted");
        let mut pe = PeakEwma::new(backends(&[(1, true), (1, true)]), &fast);
        assert_eq!(counts(&mut pe, 100, &[], &load(&[0, 0], &[0, 6])), [100, 0]);
        for bad in [
            r#"{"unmeasured_latency_ms": 0}"#,
            r#"{"unmeasured_latency_ms": 60001}"#,
        ] {
            let err = settings(bad).expect_err(bad);
            assert!(err.contains("must be from 1 to 60000"), "{err}");
        }
        let err = settings(r#"{"unmeasured_latency_ms": "5"}"#).expect_err("a string");
        assert!(err.contains("whole number"), "{err}");
        let err = settings(r#"{"latency": 5}"#).expect_err("unknown");
        assert!(err.contains("accepts `unmeasured_latency_ms`"), "{err}");
    }

    #[test]
    fn queued_requests_make_a_fast_backend_expensive() {
        let mut pe = PeakEwma::new(backends(&[(1, true), (1, true)]), &Default::default());
        // 10 ms × 10 > 50 ms × 1.
        assert_eq!(
            counts(&mut pe, 100, &[], &load(&[9, 0], &[10, 50])),
            [0, 100]
        );
        // 10 ms × 4 < 50 ms × 1.
        assert_eq!(
            counts(&mut pe, 100, &[], &load(&[3, 0], &[10, 50])),
            [100, 0]
        );
    }

    #[test]
    fn cost_is_weighed() {
        let mut pe = PeakEwma::new(backends(&[(4, true), (1, true)]), &Default::default());
        // 40 ms / 4 < 20 ms / 1.
        assert_eq!(
            counts(&mut pe, 100, &[], &load(&[0, 0], &[40, 20])),
            [100, 0]
        );
        let mut pe = PeakEwma::new(backends(&[(1, true), (1, true)]), &Default::default());
        assert_eq!(
            counts(&mut pe, 100, &[], &load(&[0, 0], &[40, 20])),
            [0, 100]
        );
    }

    #[test]
    fn the_slowest_of_many_is_never_picked_and_the_fastest_most() {
        let mut pe = PeakEwma::new(backends(&[(1, true); 4]), &Default::default());
        let got = counts(&mut pe, 10_000, &[], &load(&[0; 4], &[20, 500, 5, 40]));
        assert_eq!(got[1], 0, "{got:?}");
        assert!(got[2] > got[0] && got[0] > got[3], "{got:?}");
    }

    #[test]
    fn skips_unhealthy_and_excluded() {
        let mut pe = PeakEwma::new(
            backends(&[(1, true), (1, false), (1, true)]),
            &Default::default(),
        );
        let fast_unhealthy = load(&[0, 0, 0], &[50, 1, 40]);
        assert_eq!(counts(&mut pe, 100, &[], &fast_unhealthy), [0, 0, 100]);
        assert_eq!(counts(&mut pe, 100, &[2], &fast_unhealthy), [100, 0, 0]);
        assert_eq!(counts(&mut pe, 100, &[0, 2], &fast_unhealthy), [0, 100, 0]);
        let nothing = PickRequest {
            exclude: &[0, 1, 2],
            ..Default::default()
        };
        assert_eq!(pe.pick(&nothing, &fast_unhealthy), None);
    }

    #[test]
    fn balances_over_all_when_none_is_healthy() {
        let mut pe = PeakEwma::new(backends(&[(1, false), (1, false)]), &Default::default());
        assert_eq!(counts(&mut pe, 100, &[], &load(&[0, 0], &[9, 3])), [0, 100]);
    }

    #[test]
    fn follows_backends_joining_and_leaving() {
        let mut pe = PeakEwma::new(backends(&[]), &Default::default());
        assert_eq!(
            pe.pick(&PickRequest::default(), &FixedLoad::default()),
            None
        );
        pe.rebuild(backends(&[(1, true)]), &Default::default());
        assert_eq!(counts(&mut pe, 10, &[], &load(&[5], &[900])), [10]);
        pe.rebuild(backends(&[(1, true), (1, true)]), &Default::default());
        let got = counts(&mut pe, 10, &[], &load(&[5, 0], &[900]));
        assert_eq!(
            got,
            [0, 10],
            "a new backend at the default 30 ms beats a slow one"
        );
        pe.rebuild(backends(&[(1, true), (1, false)]), &Default::default());
        assert_eq!(counts(&mut pe, 10, &[], &load(&[5, 0], &[900])), [10, 0]);
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let mut pe = PeakEwma::new(backends(&[(10_000, true), (1, true)]), &Default::default());
        let got = counts(
            &mut pe,
            10,
            &[],
            &load(&[u32::MAX, u32::MAX], &[u64::MAX / MS; 2]),
        );
        assert_eq!(got.iter().sum::<u64>(), 10);
    }
}
