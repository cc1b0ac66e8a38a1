//! The backend list a balancer keeps between rebuilds, and the candidate set of one pick.
//!
//! Candidates are the healthy backends a retry has not tried yet. When none of those is healthy,
//! the set falls back to every backend the retry has not tried (Envoy's "panic" behaviour):
//! sending traffic to backends marked unhealthy beats refusing it, because health is a guess and
//! an empty pick fails the request for certain. A pick therefore finds nothing only when the list
//! is empty or every backend is excluded.

/// One backend as strategies see it: the parts of the host's `backend` record that balancing
/// needs. Labels are left out because no built-in strategy reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// `host:port`, the identity that survives rebuilds (indexes do not).
    pub address: String,
    /// Relative weight; the host sends 1 to 10000.
    pub weight: u32,
    /// Whether health checks currently let the backend in.
    pub healthy: bool,
}

impl Backend {
    pub fn new(address: impl Into<String>, weight: u32, healthy: bool) -> Self {
        Self {
            address: address.into(),
            weight,
            healthy,
        }
    }
}

/// A route's backends, indexed as the host indexes them, with what picks need precomputed so
/// that the common pick (no retry exclusions) costs no scan.
#[derive(Clone, Debug, Default)]
pub struct Backends {
    list: Vec<Backend>,
    /// Indexes of healthy backends, ascending.
    healthy: Vec<u32>,
    /// Inclusive running sums of weights over `list`.
    all_prefix: Vec<u64>,
    /// Inclusive running sums of weights over `healthy`.
    healthy_prefix: Vec<u64>,
}

impl Backends {
    pub fn new(list: Vec<Backend>) -> Self {
        let mut healthy = Vec::new();
        let mut all_prefix = Vec::with_capacity(list.len());
        let mut healthy_prefix = Vec::new();
        let (mut all_sum, mut healthy_sum) = (0u64, 0u64);
        for (i, backend) in list.iter().enumerate() {
            let weight = effective_weight(backend.weight);
            all_sum += weight;
            all_prefix.push(all_sum);
            if backend.healthy {
                healthy_sum += weight;
                healthy.push(index(i));
                healthy_prefix.push(healthy_sum);
            }
        }
        Self {
            list,
            healthy,
            all_prefix,
            healthy_prefix,
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn get(&self, index: u32) -> Option<&Backend> {
        self.list.get(index as usize)
    }

    /// The backends in host order.
    pub fn as_slice(&self) -> &[Backend] {
        &self.list
    }

    /// The backend's weight as used for balancing: at least 1, so that a zero from a buggy
    /// registry entry cannot divide by zero or starve a backend that health says is fine.
    /// Out-of-range indexes weigh 1 for the same reason.
    pub fn weight(&self, index: u32) -> u64 {
        self.get(index).map_or(1, |b| effective_weight(b.weight))
    }

    pub fn is_healthy(&self, index: u32) -> bool {
        self.get(index).is_some_and(|b| b.healthy)
    }

    pub fn healthy_count(&self) -> usize {
        self.healthy.len()
    }

    /// The backends one pick may choose from; see the module notes for the fallback.
    pub fn candidates<'a>(&'a self, exclude: &'a [u32]) -> Candidates<'a> {
        if exclude.is_empty() {
            return if self.healthy.is_empty() {
                Candidates {
                    backends: self,
                    exclude,
                    healthy_only: false,
                    len: self.list.len(),
                    total_weight: self.all_prefix.last().copied().unwrap_or(0),
                }
            } else {
                Candidates {
                    backends: self,
                    exclude,
                    healthy_only: true,
                    len: self.healthy.len(),
                    total_weight: self.healthy_prefix.last().copied().unwrap_or(0),
                }
            };
        }
        let (mut all_len, mut all_weight, mut healthy_len, mut healthy_weight) = (0, 0, 0, 0);
        for (i, backend) in self.list.iter().enumerate() {
            if exclude.contains(&index(i)) {
                continue;
            }
            let weight = effective_weight(backend.weight);
            all_len += 1;
            all_weight += weight;
            if backend.healthy {
                healthy_len += 1;
                healthy_weight += weight;
            }
        }
        let healthy_only = healthy_len > 0;
        Candidates {
            backends: self,
            exclude,
            healthy_only,
            len: if healthy_only { healthy_len } else { all_len },
            total_weight: if healthy_only {
                healthy_weight
            } else {
                all_weight
            },
        }
    }
}

impl FromIterator<Backend> for Backends {
    fn from_iter<I: IntoIterator<Item = Backend>>(iter: I) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

/// The backends one pick may choose from, in host order.
#[derive(Clone, Copy, Debug)]
pub struct Candidates<'a> {
    backends: &'a Backends,
    exclude: &'a [u32],
    healthy_only: bool,
    len: usize,
    total_weight: u64,
}

impl<'a> Candidates<'a> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sum of the candidates' weights.
    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// True when no candidate was healthy and the set fell back to unhealthy backends.
    pub fn is_fallback(&self) -> bool {
        !self.healthy_only && !self.is_empty()
    }

    pub fn backends(&self) -> &'a Backends {
        self.backends
    }

    pub fn contains(&self, index: u32) -> bool {
        (index as usize) < self.backends.len()
            && (!self.healthy_only || self.backends.is_healthy(index))
            && !self.exclude.contains(&index)
    }

    /// The candidates' indexes, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        let this = *self;
        (0..self.backends.len())
            .map(index)
            .filter(move |&i| this.contains(i))
    }

    /// The `n`th candidate in host order.
    pub fn nth(&self, n: usize) -> Option<u32> {
        if n >= self.len {
            return None;
        }
        if self.exclude.is_empty() {
            return Some(if self.healthy_only {
                self.backends.healthy[n]
            } else {
                index(n)
            });
        }
        self.iter().nth(n)
    }

    pub fn first(&self) -> Option<u32> {
        self.nth(0)
    }

    /// The candidate that owns `point` when each candidate owns a stretch of
    /// `0..total_weight()` as long as its weight, in host order.
    pub fn weighted(&self, point: u64) -> Option<u32> {
        if point >= self.total_weight {
            return None;
        }
        if self.exclude.is_empty() {
            let prefix = self.prefix();
            let position = prefix.partition_point(|&sum| sum <= point);
            return if self.healthy_only {
                self.backends.healthy.get(position).copied()
            } else {
                (position < prefix.len()).then(|| index(position))
            };
        }
        let mut sum = 0;
        self.iter().find(|&i| {
            sum += self.backends.weight(i);
            point < sum
        })
    }

    /// Like [`Self::weighted`] over the candidates other than `skip`: `point` ranges over
    /// `0..total_weight() - weight(skip)`. Used to draw a second, distinct candidate.
    pub fn weighted_skipping(&self, point: u64, skip: u32) -> Option<u32> {
        if !self.contains(skip) {
            return self.weighted(point);
        }
        let skip_weight = self.backends.weight(skip);
        let before = self.weight_before(skip);
        let point = if point >= before {
            point.saturating_add(skip_weight)
        } else {
            point
        };
        self.weighted(point)
    }

    /// A candidate drawn with probability proportional to its weight.
    pub fn random(&self, entropy: u64) -> Option<u32> {
        self.weighted(crate::hash::uniform(entropy, self.total_weight))
    }

    /// Two distinct candidates, each drawn in proportion to weight (the second among those left),
    /// for power-of-two-choices; the second is `None` when there is only one candidate.
    pub fn random_pair(&self, entropy: u64) -> Option<(u32, Option<u32>)> {
        let first = self.random(entropy)?;
        if self.len < 2 {
            return Some((first, None));
        }
        let rest = self.total_weight - self.backends.weight(first);
        let second = self.weighted_skipping(
            crate::hash::uniform(crate::hash::mix64(entropy), rest),
            first,
        );
        Some((first, second))
    }

    /// Power of two choices: two distinct weighted draws, and the one with the lower
    /// `cost / weight` wins (the first draw on a tie).
    pub fn two_choices(&self, entropy: u64, cost: impl Fn(u32) -> u128) -> Option<u32> {
        let (a, b) = self.random_pair(entropy)?;
        let Some(b) = b else { return Some(a) };
        let weight = |i| self.backends.weight(i);
        let b_wins = crate::load::cmp_per_weight(cost(b), weight(b), cost(a), weight(a)).is_lt();
        Some(if b_wins { b } else { a })
    }

    fn prefix(&self) -> &'a [u64] {
        if self.healthy_only {
            &self.backends.healthy_prefix
        } else {
            &self.backends.all_prefix
        }
    }

    /// Sum of the weights of candidates before `candidate`, which must be one.
    fn weight_before(&self, candidate: u32) -> u64 {
        let own = self.backends.weight(candidate);
        if self.exclude.is_empty() {
            let position = if self.healthy_only {
                self.backends.healthy.binary_search(&candidate).ok()
            } else {
                Some(candidate as usize)
            };
            if let Some(sum) = position.and_then(|p| self.prefix().get(p)) {
                return sum - own;
            }
        }
        self.iter()
            .take_while(|&i| i != candidate)
            .map(|i| self.backends.weight(i))
            .sum()
    }
}

fn effective_weight(weight: u32) -> u64 {
    u64::from(weight.max(1))
}

/// Backend positions are `u32` in the contract; a list longer than that cannot come from the
/// host, so saturating is only a guard.
fn index(position: usize) -> u32 {
    u32::try_from(position).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(spec: &[(u32, bool)]) -> Backends {
        spec.iter()
            .enumerate()
            .map(|(i, &(weight, healthy))| Backend::new(format!("10.0.0.{i}:80"), weight, healthy))
            .collect()
    }

    #[test]
    fn candidates_are_healthy_backends_not_excluded() {
        let b = list(&[(1, true), (1, false), (1, true), (1, true)]);
        let c = b.candidates(&[]);
        assert_eq!(c.iter().collect::<Vec<_>>(), [0, 2, 3]);
        assert_eq!(c.len(), 3);
        assert!(!c.is_fallback());
        let c = b.candidates(&[2]);
        assert_eq!(c.iter().collect::<Vec<_>>(), [0, 3]);
        assert_eq!((c.nth(0), c.nth(1), c.nth(2)), (Some(0), Some(3), None));
    }

    #[test]
    fn no_healthy_backend_falls_back_to_all_not_excluded() {
        let b = list(&[(1, false), (1, false), (1, false)]);
        let c = b.candidates(&[]);
        assert!(c.is_fallback());
        assert_eq!(c.iter().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(b.candidates(&[1]).iter().collect::<Vec<_>>(), [0, 2]);
    }

    #[test]
    fn excluding_every_healthy_backend_falls_back_to_the_unhealthy_rest() {
        let b = list(&[(1, true), (1, false), (1, false)]);
        let c = b.candidates(&[0]);
        assert!(c.is_fallback());
        assert_eq!(c.iter().collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn nothing_to_pick_when_empty_or_all_excluded() {
        assert!(Backends::default().candidates(&[]).is_empty());
        let b = list(&[(1, true), (1, false)]);
        let c = b.candidates(&[0, 1]);
        assert!(c.is_empty() && !c.is_fallback());
        assert_eq!(
            (c.first(), c.random(7), c.random_pair(7)),
            (None, None, None)
        );
    }

    #[test]
    fn exclusions_out_of_range_or_repeated_are_harmless() {
        let b = list(&[(2, true), (3, true)]);
        let c = b.candidates(&[9, 0, 0]);
        assert_eq!((c.len(), c.total_weight()), (1, 3));
        assert_eq!(c.iter().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn weighted_points_map_to_stretches_in_host_order() {
        let b = list(&[(2, true), (1, false), (3, true)]);
        for exclude in [&[][..], &[1][..], &[7][..]] {
            let c = b.candidates(exclude);
            assert_eq!(c.total_weight(), 5);
            let owners: Vec<_> = (0..6).map(|p| c.weighted(p)).collect();
            assert_eq!(
                owners,
                [Some(0), Some(0), Some(2), Some(2), Some(2), None],
                "exclude {exclude:?}"
            );
            // Skipping 0 leaves only 2's stretch; skipping 2 leaves only 0's.
            assert_eq!(c.weighted_skipping(0, 0), Some(2));
            assert_eq!(c.weighted_skipping(2, 0), Some(2));
            assert_eq!(c.weighted_skipping(1, 2), Some(0));
        }
    }

    #[test]
    fn zero_weight_counts_as_one() {
        let b = list(&[(0, true), (0, true)]);
        assert_eq!(b.candidates(&[]).total_weight(), 2);
        assert_eq!(b.weight(0), 1);
    }

    #[test]
    fn random_follows_weights_and_pairs_are_distinct() {
        let b = list(&[(1, true), (3, true), (6, true), (5, false)]);
        for exclude in [&[][..], &[3][..]] {
            let c = b.candidates(exclude);
            let mut counts = [0u32; 4];
            for n in 0..100_000u64 {
                let e = crate::hash::mix64(n);
                counts[c.random(e).map_or(3, |i| i as usize)] += 1;
                let (x, y) = c.random_pair(e).expect("candidates exist");
                let y = y.expect("three candidates");
                assert_ne!(x, y);
                assert!(c.contains(x) && c.contains(y));
            }
            assert_eq!(counts[3], 0);
            for (i, share) in [(0, 0.1), (1, 0.3), (2, 0.6)] {
                let got = f64::from(counts[i]) / 100_000.0;
                assert!((got - share).abs() < 0.01, "backend {i}: {got} vs {share}");
            }
        }
    }

    #[test]
    fn a_single_candidate_pairs_with_nobody() {
        let b = list(&[(1, true), (1, false)]);
        assert_eq!(b.candidates(&[]).random_pair(42), Some((0, None)));
    }
}
