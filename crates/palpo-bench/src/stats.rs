//! Percentiles and the figures a run reports.

use std::collections::BTreeMap;

/// The `p`-th percentile (0..=100) of `samples` by nearest rank, or `None` when empty.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let p = p.clamp(0.0, 100.0);
    // Nearest rank: the smallest value with at least p% of the samples at or below it.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The median of `samples`, or `None` when empty.
pub fn median(samples: &[f64]) -> Option<f64> {
    percentile(samples, 50.0)
}

/// Named figures of one run, e.g. `load.sent_events_per_s`. Units are in the name's suffix:
/// `_ms`, `_mb`, `_per_s`, or a plain count.
#[derive(Debug, Default, Clone)]
pub struct Figures(pub BTreeMap<String, f64>);

impl Figures {
    pub fn set(&mut self, name: impl Into<String>, value: f64) {
        self.0.insert(name.into(), value);
    }

    pub fn set_opt(&mut self, name: impl Into<String>, value: Option<f64>) {
        if let Some(value) = value {
            self.set(name, value);
        }
    }

    /// Latency figures `<prefix>_p50_ms` etc. for samples in milliseconds.
    pub fn set_latencies(&mut self, prefix: &str, samples: &[f64], ps: &[f64]) {
        for p in ps {
            self.set_opt(format!("{prefix}_p{p}_ms"), percentile(samples, *p));
        }
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }

    pub fn extend(&mut self, other: Figures) {
        self.0.extend(other.0);
    }
}

/// Whether a larger value of this figure is better (throughput) or worse (latency, memory).
pub fn higher_is_better(name: &str) -> bool {
    name.ends_with("_per_s")
}

/// Formats a value with a precision that suits its size.
pub fn fmt_value(v: f64) -> String {
    if v == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), Some(50.0));
        assert_eq!(percentile(&s, 95.0), Some(95.0));
        assert_eq!(percentile(&s, 99.0), Some(99.0));
        assert_eq!(percentile(&s, 100.0), Some(100.0));
        assert_eq!(percentile(&s, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        // Order of the input does not matter; one sample is every percentile.
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.0));
    }

    #[test]
    fn direction_of_figures() {
        assert!(higher_is_better("load.sent_events_per_s"));
        assert!(!higher_is_better("load.send_p99_ms"));
        assert!(!higher_is_better("rss.idle_mb"));
    }
}
