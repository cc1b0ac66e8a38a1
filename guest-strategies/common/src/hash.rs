//! Stable hashing, and turning the host's random bits into bounded choices.
//!
//! Everything here is fixed-key and platform-independent on purpose: a consistent-hash table
//! must come out the same in every worker, after every hot swap and in every Harbor version,
//! or keys move for no reason. `std`'s `DefaultHasher` promises none of that.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a: stable across platforms and releases, good enough for short strings such as
/// addresses once its output goes through [`mix64`].
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// The splitmix64 finaliser: a bijection that spreads every input bit over the whole output.
/// FNV's low bits are weak and the host's hash key may be anything, so values are mixed before
/// being reduced to a range; it also derives independent-looking values from one seed.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Maps 64 random bits to `0..n` (0 when `n` is 0) by multiply-high, which uses the high bits
/// and avoids the bias and division of `bits % n`. The bias left is at most `n / 2^64`.
pub fn uniform(bits: u64, n: u64) -> u64 {
    ((u128::from(bits) * u128::from(n)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn mix64_is_fixed_and_spreads_neighbours() {
        assert_eq!(mix64(0), 0xe220_a839_7b1d_cdaf);
        let flipped = (mix64(1) ^ mix64(2)).count_ones();
        assert!((16..=48).contains(&flipped), "{flipped} bits differ");
    }

    #[test]
    fn uniform_stays_in_range_and_covers_it() {
        assert_eq!(uniform(u64::MAX, 0), 0);
        assert_eq!(uniform(u64::MAX, 7), 6);
        assert_eq!(uniform(0, 7), 0);
        let mut seen = [0u32; 5];
        for n in 0..50_000 {
            seen[uniform(mix64(n), 5) as usize] += 1;
        }
        assert!(
            seen.iter().all(|&c| (9_500..=10_500).contains(&c)),
            "{seen:?}"
        );
    }
}
