//! First: always the first candidate in list order, so traffic fills one backend and spills to
//! the next only when that one is unhealthy or a retry excludes it (HAProxy's `first`, without
//! its `maxconn` limit: spilling on load would need a per-backend limit the contract does not
//! carry). Useful to keep idle backends idle, e.g. so that they can be scaled down, or for an
//! active/standby pair listed in order of preference.

use harbor_strategy_common::{
    Algorithm, Backends, Load, PickPlan, PickRequest, PickTable, TableIndex,
};

pub struct First {
    backends: Backends,
}

impl Algorithm for First {
    const NAME: &'static str = "first";

    type Settings = ();

    fn new(backends: Backends, _settings: &()) -> Self {
        Self { backends }
    }

    fn pick(&mut self, request: &PickRequest, _load: &impl Load) -> Option<u32> {
        self.backends.candidates(request.exclude).first()
    }

    fn plan(&mut self) -> Option<PickPlan> {
        self.table().map(PickPlan::Table)
    }
}

impl First {
    /// The first-try picks written out.
    pub fn table(&mut self) -> Option<PickTable> {
        let first = self.backends.candidates(&[]).first();
        PickTable::new(TableIndex::Sequence, first.into_iter().collect())
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
            .map(|(i, &healthy)| Backend::new(format!("10.0.0.{i}:80"), 1, healthy))
            .collect()
    }

    fn pick(first: &mut First, sequence: u64, exclude: &[u32]) -> Option<u32> {
        first.pick(
            &PickRequest {
                sequence,
                entropy: sequence.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                hash_key: None,
                exclude,
            },
            &FixedLoad::default(),
        )
    }

    #[test]
    fn always_the_first_healthy_backend() {
        let mut first = First::new(backends(&[false, true, true]), &());
        assert!((0..100).all(|n| pick(&mut first, n, &[]) == Some(1)));
    }

    #[test]
    fn a_retry_spills_to_the_next() {
        let mut first = First::new(backends(&[true, true, true]), &());
        assert_eq!(pick(&mut first, 0, &[0]), Some(1));
        assert_eq!(pick(&mut first, 0, &[0, 1]), Some(2));
        assert_eq!(pick(&mut first, 0, &[0, 1, 2]), None);
    }

    #[test]
    fn with_nothing_healthy_the_first_of_all() {
        let mut first = First::new(backends(&[false, false]), &());
        assert_eq!(pick(&mut first, 3, &[]), Some(0));
        let mut first = First::new(backends(&[true, false, false]), &());
        assert_eq!(pick(&mut first, 3, &[0]), Some(1));
    }

    #[test]
    fn follows_backends_joining_leaving_and_recovering() {
        let mut first = First::new(backends(&[]), &());
        assert_eq!(pick(&mut first, 0, &[]), None);
        first.rebuild(backends(&[false, true]), &());
        assert_eq!(pick(&mut first, 0, &[]), Some(1));
        first.rebuild(backends(&[true, true]), &());
        assert_eq!(
            pick(&mut first, 0, &[]),
            Some(0),
            "the preferred backend recovered"
        );
        first.rebuild(backends(&[true]), &());
        assert_eq!(pick(&mut first, 0, &[]), Some(0));
    }
}
