//! Summaries of repeated measurements.

/// The lower quartile, median and upper quartile of `values`, each interpolated between the
/// two nearest ranks, so that an even count (runs left out can leave one) favours neither
/// middle value.
#[allow(dead_code)] // each bench uses the part it prints
pub fn quartiles(values: impl IntoIterator<Item = f64>) -> Option<[f64; 3]> {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = q * (v.len() - 1) as f64;
        let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
        v[low] + (v[high] - v[low]) * (rank - low as f64)
    };
    Some([at(0.25), at(0.5), at(0.75)])
}

/// The median of `values`: see [`quartiles`].
#[allow(dead_code)]
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    quartiles(values).map(|[_, m, _]| m)
}
