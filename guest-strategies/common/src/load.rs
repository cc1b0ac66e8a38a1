//! The host's live load seen through a trait, so that algorithms read it from the `load` import
//! in wasm and from fixed numbers in native tests (where the import stubs must not be called).

use std::cmp::Ordering;

/// Live load of the route's backends, indexed like the last backend list.
pub trait Load {
    /// Connections or requests in flight to the backend; 0 for an unknown index.
    fn in_flight(&self, index: u32) -> u32;
    /// Latency EWMA in nanoseconds; 0 until measured or for an unknown index.
    fn latency_ewma_ns(&self, index: u32) -> u64;
}

impl<T: Load + ?Sized> Load for &T {
    fn in_flight(&self, index: u32) -> u32 {
        (**self).in_flight(index)
    }

    fn latency_ewma_ns(&self, index: u32) -> u64 {
        (**self).latency_ewma_ns(index)
    }
}

/// Load given as numbers, for tests and simulations; indexes past the end read as zero, as the
/// host's do.
#[derive(Clone, Debug, Default)]
pub struct FixedLoad {
    pub in_flight: Vec<u32>,
    pub latency_ewma_ns: Vec<u64>,
}

impl FixedLoad {
    pub fn with_in_flight(in_flight: impl Into<Vec<u32>>) -> Self {
        Self {
            in_flight: in_flight.into(),
            latency_ewma_ns: Vec::new(),
        }
    }
}

impl Load for FixedLoad {
    fn in_flight(&self, index: u32) -> u32 {
        self.in_flight.get(index as usize).copied().unwrap_or(0)
    }

    fn latency_ewma_ns(&self, index: u32) -> u64 {
        self.latency_ewma_ns
            .get(index as usize)
            .copied()
            .unwrap_or(0)
    }
}

/// Orders `cost_a / weight_a` against `cost_b / weight_b` by cross-multiplying, so that weights
/// count exactly (no integer division rounding small loads to the same value). Saturates rather
/// than overflows; costs that large are equal for balancing purposes.
pub fn cmp_per_weight(cost_a: u128, weight_a: u64, cost_b: u128, weight_b: u64) -> Ordering {
    cost_a
        .saturating_mul(u128::from(weight_b))
        .cmp(&cost_b.saturating_mul(u128::from(weight_a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_weight_comparison_is_exact() {
        // 2/3 < 1/1, 3/3 == 1/1, 4/3 > 1/1.
        assert_eq!(cmp_per_weight(2, 3, 1, 1), Ordering::Less);
        assert_eq!(cmp_per_weight(3, 3, 1, 1), Ordering::Equal);
        assert_eq!(cmp_per_weight(4, 3, 1, 1), Ordering::Greater);
        // Integer division would call 5/3 and 4/3 equal.
        assert_eq!(cmp_per_weight(5, 3, 4, 3), Ordering::Greater);
        assert_eq!(
            cmp_per_weight(u128::MAX, 2, u128::MAX, 3),
            Ordering::Equal,
            "saturates instead of overflowing"
        );
    }

    #[test]
    fn fixed_load_reads_zero_past_the_end() {
        let load = FixedLoad::with_in_flight([4, 5]);
        assert_eq!((load.in_flight(1), load.in_flight(2)), (5, 0));
        assert_eq!(Load::latency_ewma_ns(&&load, 0), 0);
    }
}
