//! Latency distributions and drawing from them.

use rand::{Rng, RngExt};
use rand_distr::{Exp, LogNormal, Normal};

/// A validated latency distribution, in nanoseconds.
#[derive(Clone, Debug, PartialEq)]
pub enum Dist {
    Fixed(u64),
    /// Inclusive bounds.
    Uniform {
        min: u64,
        max: u64,
    },
    Exponential(Exp<f64>),
    /// Negative draws become 0.
    Normal(Normal<f64>),
    LogNormal(LogNormal<f64>),
}

/// A distribution and an optional upper clamp.
#[derive(Clone, Debug, PartialEq)]
pub struct Latency {
    pub dist: Dist,
    pub max_ns: Option<u64>,
}

impl Latency {
    pub fn fixed(ns: u64) -> Self {
        Latency {
            dist: Dist::Fixed(ns),
            max_ns: None,
        }
    }

    /// True when drawing takes nothing from the RNG.
    pub fn is_fixed(&self) -> bool {
        matches!(self.dist, Dist::Fixed(_))
    }

    /// One latency in nanoseconds. Fixed latencies do not touch `rng`; every
    /// other distribution takes its draws from it.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        let ns = match &self.dist {
            Dist::Fixed(ns) => *ns,
            Dist::Uniform { min, max } => rng.random_range(*min..=*max),
            Dist::Exponential(d) => float_ns(rng.sample(d)),
            Dist::Normal(d) => float_ns(rng.sample(d)),
            Dist::LogNormal(d) => float_ns(rng.sample(d)),
        };
        self.max_ns.map_or(ns, |max| ns.min(max))
    }
}

/// Nanoseconds from a float draw: rounded, negative and NaN to 0, huge
/// values saturate.
fn float_ns(x: f64) -> u64 {
    if x.is_nan() || x <= 0.0 {
        0
    } else {
        // `as` saturates at u64::MAX.
        x.round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const N: usize = 20_000;

    fn draws(l: &Latency) -> Vec<u64> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        (0..N).map(|_| l.sample(&mut rng)).collect()
    }

    fn mean(v: &[u64]) -> f64 {
        v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
    }

    fn median(v: &[u64]) -> f64 {
        let mut v = v.to_vec();
        v.sort_unstable();
        v[v.len() / 2] as f64
    }

    fn assert_near(what: &str, got: f64, want: f64, tolerance: f64) {
        assert!(
            (got - want).abs() <= want * tolerance,
            "{what}: got {got}, want {want} ± {}%",
            tolerance * 100.0
        );
    }

    #[test]
    fn fixed_is_fixed_and_draws_nothing() {
        let l = Latency::fixed(100_000);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let before = rng.clone();
        assert!(draws(&l).iter().all(|&x| x == 100_000));
        assert_eq!(l.sample(&mut rng), 100_000);
        assert_eq!(rng, before);
    }

    #[test]
    fn uniform_covers_its_range_with_the_right_mean() {
        let l = Latency {
            dist: Dist::Uniform {
                min: 50_000,
                max: 2_000_000,
            },
            max_ns: None,
        };
        let v = draws(&l);
        assert!(v.iter().all(|&x| (50_000..=2_000_000).contains(&x)));
        assert_near("uniform mean", mean(&v), 1_025_000.0, 0.03);
        assert!(*v.iter().min().unwrap() < 100_000);
        assert!(*v.iter().max().unwrap() > 1_950_000);
    }

    #[test]
    fn exponential_mean() {
        let l = Latency {
            dist: Dist::Exponential(Exp::new(1.0 / 1e6).unwrap()),
            max_ns: None,
        };
        let v = draws(&l);
        assert_near("exponential mean", mean(&v), 1e6, 0.05);
        // Median of an exponential is mean·ln 2.
        assert_near("exponential median", median(&v), 1e6 * 2f64.ln(), 0.05);
    }

    #[test]
    fn normal_mean_and_clamp_at_zero() {
        let l = Latency {
            dist: Dist::Normal(Normal::new(1e6, 2e5).unwrap()),
            max_ns: None,
        };
        assert_near("normal mean", mean(&draws(&l)), 1e6, 0.02);
        let wide = Latency {
            dist: Dist::Normal(Normal::new(1e5, 1e6).unwrap()),
            max_ns: None,
        };
        let v = draws(&wide);
        let zeros = v.iter().filter(|&&x| x == 0).count();
        // P(N(0.1, 1) < 0) ≈ 0.46.
        assert_near("share clamped to 0", zeros as f64 / N as f64, 0.46, 0.08);
    }

    #[test]
    fn lognormal_median() {
        let l = Latency {
            dist: Dist::LogNormal(LogNormal::new(1e6f64.ln(), 0.5).unwrap()),
            max_ns: None,
        };
        let v = draws(&l);
        assert_near("lognormal median", median(&v), 1e6, 0.05);
        // Mean of a log-normal is median·exp(σ²/2).
        assert_near("lognormal mean", mean(&v), 1e6 * (0.125f64).exp(), 0.05);
    }

    #[test]
    fn max_clamps_any_distribution() {
        let l = Latency {
            dist: Dist::Exponential(Exp::new(1.0 / 1e6).unwrap()),
            max_ns: Some(500_000),
        };
        let v = draws(&l);
        assert!(v.iter().all(|&x| x <= 500_000));
        // P(X > mean/2) = e^-0.5 ≈ 0.61 of draws sit at the clamp.
        let clamped = v.iter().filter(|&&x| x == 500_000).count() as f64 / N as f64;
        assert_near("share at the clamp", clamped, (-0.5f64).exp(), 0.05);
    }
}
