//! Summaries of repeated measurements.

/// The median of `values`; with an even count (runs left out can leave one), the mean of the
/// middle two, so that it favours neither.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    match v.len() {
        0 => None,
        n if n.is_multiple_of(2) => Some((v[mid - 1] + v[mid]) / 2.0),
        _ => Some(v[mid]),
    }
}
