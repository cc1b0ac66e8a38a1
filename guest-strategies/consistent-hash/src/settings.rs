//! `consistent-hash`'s one setting, the Maglev table size: `{"table_size": N}`, N a prime.
//! A route keeps the size it was built with through backend changes, so that only a change of
//! its settings moves its keys.

use harbor_strategy_common::Algorithm;
use harbor_strategy_common::config::Settings;

use crate::maglev::Maglev;

/// Maglev's recommended size (as in Envoy): a prime, far above the backend count so that each
/// backend's share is even to a fraction of a percent.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// Below this, shares of a handful of backends are visibly uneven.
pub const MIN_TABLE_SIZE: u32 = 101;
/// About 4 MB of table per balancer; more buys nothing measurable.
pub const MAX_TABLE_SIZE: u32 = 1_000_003;

/// A route's table size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableSize(pub u32);

impl Default for TableSize {
    fn default() -> Self {
        Self(DEFAULT_TABLE_SIZE)
    }
}

/// The table size `settings` ask for: none (the default) or `table_size`, a prime in
/// [`MIN_TABLE_SIZE`]`..=`[`MAX_TABLE_SIZE`].
pub fn parse(mut settings: Settings) -> Result<TableSize, String> {
    let size = settings.take_u64("table_size")?;
    settings.finish(Maglev::NAME, &["table_size"])?;
    let Some(size) = size else {
        return Ok(TableSize::default());
    };
    let valid = u32::try_from(size)
        .ok()
        .filter(|n| (MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(n) && is_prime(*n));
    valid.map(TableSize).ok_or_else(|| {
        format!(
            "`table_size` must be a prime from {MIN_TABLE_SIZE} to {MAX_TABLE_SIZE} \
             ({DEFAULT_TABLE_SIZE} by default), got {size}"
        )
    })
}

/// Maglev's permutations cover the whole table only when its size is prime.
fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<u32, String> {
        super::parse(Settings::parse(text)?).map(|size| size.0)
    }

    #[test]
    fn blank_and_empty_mean_the_default() {
        for text in ["", " ", "{}", "{ }"] {
            assert_eq!(parse(text), Ok(DEFAULT_TABLE_SIZE), "{text:?}");
        }
    }

    #[test]
    fn accepts_primes_in_range() {
        assert_eq!(parse(r#"{"table_size": 101}"#), Ok(101));
        assert_eq!(parse(r#"{"table_size": 5003}"#), Ok(5003));
        assert_eq!(parse(r#"{"table_size": 1000003}"#), Ok(MAX_TABLE_SIZE));
    }

    #[test]
    fn refuses_composites_out_of_range_and_unknown_keys() {
        for size in ["65536", "97", "1000033", "4294967311", "0", "1"] {
            let err = parse(&format!(r#"{{"table_size": {size}}}"#)).expect_err(size);
            assert!(
                err.contains("must be a prime") && err.ends_with(size),
                "{err}"
            );
        }
        let err = parse(r#"{"size": 101}"#).expect_err("unknown key");
        assert!(err.contains("no setting `size`"), "{err}");
        assert!(parse(r#"{"table_size": "101"}"#).is_err());
    }

    #[test]
    fn primality() {
        let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(DEFAULT_TABLE_SIZE) && is_prime(MAX_TABLE_SIZE));
        assert!(!is_prime(1_000_001));
    }
}
