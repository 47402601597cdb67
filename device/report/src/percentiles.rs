//! Nearest-rank percentiles of round trips and durations.

use serde::{Deserialize, Serialize};

/// Nearest-rank percentile (`q` in 0..=1) of an ascending slice.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `x` rounded to `decimals` decimal places.
pub fn round_to(x: f64, decimals: i32) -> f64 {
    let k = 10f64.powi(decimals);
    (x * k).round() / k
}

/// Round-trip percentiles in microseconds; `None` (JSON `null`) when no
/// fence signaled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RttUs {
    pub p50: Option<u64>,
    pub p99: Option<u64>,
    pub max: Option<u64>,
}

impl RttUs {
    /// The percentiles of round trips given in nanoseconds, in any order.
    pub fn from_ns(samples: &[u64]) -> Self {
        let mut us: Vec<u64> = samples.iter().map(|ns| ns / 1_000).collect();
        us.sort_unstable();
        Self {
            p50: percentile(&us, 0.50),
            p99: percentile(&us, 0.99),
            max: us.last().copied(),
        }
    }

    /// `p50 A · p99 B · max C`, `-` for what was not measured.
    pub fn one_line(&self) -> String {
        let or_dash = |x: Option<u64>| x.map_or("-".into(), |v| v.to_string());
        format!(
            "p50 {} · p99 {} · max {}",
            or_dash(self.p50),
            or_dash(self.p99),
            or_dash(self.max)
        )
    }
}

/// Millisecond percentiles (nearest rank, 3 decimals); `None` when nothing
/// was measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MsPercentiles {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl MsPercentiles {
    /// The percentiles of durations given in milliseconds, in any order.
    pub fn from_ms(samples: &[f64]) -> Self {
        let mut ms = samples.to_vec();
        ms.sort_by(f64::total_cmp);
        let pick = |q: f64| -> Option<f64> {
            let rank = (q * ms.len() as f64).ceil() as usize;
            let i = rank.clamp(1, ms.len().max(1)) - 1;
            ms.get(i).map(|x| round_to(*x, 3))
        };
        Self {
            p50: pick(0.50),
            p99: pick(0.99),
            max: pick(1.0),
        }
    }

    /// `p50 A · p99 B · max C` with one decimal, `-` for what was not
    /// measured.
    pub fn one_line(&self) -> String {
        let or_dash = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.1}"));
        format!(
            "p50 {} · p99 {} · max {}",
            or_dash(self.p50),
            or_dash(self.p99),
            or_dash(self.max)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[1, 2, 3], 0.5), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 0.5), Some(2));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn rtt_is_sorted_and_in_microseconds() {
        // Unsorted nanoseconds: 3 ms, 1 ms, 2 ms, 100 ms.
        let r = RttUs::from_ns(&[3_000_000, 1_000_000, 2_000_999, 100_000_000]);
        assert_eq!(
            r,
            RttUs {
                p50: Some(2_000),
                p99: Some(100_000),
                max: Some(100_000)
            }
        );
        assert_eq!(r.one_line(), "p50 2000 · p99 100000 · max 100000");
        assert_eq!(RttUs::from_ns(&[]), RttUs::default());
        assert_eq!(RttUs::default().one_line(), "p50 - · p99 - · max -");
    }

    #[test]
    fn ms_percentiles_are_nearest_rank_and_none_when_empty() {
        let p = MsPercentiles::from_ms(&[3.0, 1.0004, 2.5, 100.0]);
        assert_eq!((p.p50, p.p99, p.max), (Some(2.5), Some(100.0), Some(100.0)));
        assert_eq!(MsPercentiles::from_ms(&[1.23456]).p50, Some(1.235));
        let none = MsPercentiles::from_ms(&[]);
        assert_eq!(none, MsPercentiles::default());
        assert_eq!(none.one_line(), "p50 - · p99 - · max -");
        assert_eq!(p.one_line(), "p50 2.5 · p99 100.0 · max 100.0");
    }

    #[test]
    fn rounding_keeps_the_asked_decimals() {
        assert_eq!(round_to(1.23456, 3), 1.235);
        assert_eq!(round_to(952.06, 1), 952.1);
    }
}
