//! The few tests of significance the Virtual Judge's checks use, so that
//! each check compares an agent with the agent population (or with the
//! agent's own earlier work) instead of with a fixed count tuned to one
//! data set: exact binomial tails, the normal tail for z statistics, and
//! the Cochran–Armitage test for a trend in a sequence of yes/no outcomes
//! (Armitage, 1955, "Tests for linear trends in proportions and
//! frequencies"). Everything is in f64 and needs no dependency.

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms; relative error below 1e-13).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let series = C[1..].iter().enumerate().fold(C[0], |s, (i, c)| s + c / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + series.ln()
}

/// P(X ≥ k) for X ~ Binomial(n, p): the chance of at least `k` successes
/// in `n` trials when each succeeds with probability `p`. Exact (a sum of
/// the probability mass in log space), so it is honest for the few dozen
/// annotations an agent test starts with.
pub fn binomial_upper_tail(k: usize, n: usize, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    let p = p.clamp(0.0, 1.0);
    if p == 0.0 {
        return 0.0;
    }
    if p == 1.0 {
        return 1.0;
    }
    let (ln_p, ln_q) = (p.ln(), (1.0 - p).ln());
    let ln_n = ln_gamma(n as f64 + 1.0);
    let tail: f64 = (k..=n)
        .map(|i| {
            let ln_choose = ln_n - ln_gamma(i as f64 + 1.0) - ln_gamma((n - i) as f64 + 1.0);
            (ln_choose + i as f64 * ln_p + (n - i) as f64 * ln_q).exp()
        })
        .sum();
    tail.min(1.0)
}

/// P(Z ≥ z) for a standard normal Z. erfc by the Chebyshev fit of
/// Numerical Recipes (§6.2, `erfcc`): relative error below 1.2e-7, far
/// finer than any threshold a check compares it with.
pub fn normal_upper_tail(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let poly = -x * x - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    let erfc = if x >= 0.0 { erfc } else { 2.0 - erfc };
    0.5 * erfc
}

/// Mean and (population) standard deviation; (0, 0) for no values.
pub fn mean_sd(values: impl IntoIterator<Item = f64>) -> (f64, f64, usize) {
    let (mut n, mut sum, mut squares) = (0usize, 0.0, 0.0);
    for v in values {
        n += 1;
        sum += v;
        squares += v * v;
    }
    if n == 0 {
        return (0.0, 0.0, 0);
    }
    let mean = sum / n as f64;
    (mean, (squares / n as f64 - mean * mean).max(0.0).sqrt(), n)
}

/// The Cochran–Armitage trend statistic of yes/no outcomes in time order
/// (scores 0, 1, 2, …): z = Σ yᵢ(tᵢ − t̄) / √(p̄(1 − p̄) Σ (tᵢ − t̄)²).
/// Positive when "yes" becomes more frequent; 0 when every outcome is the
/// same (no trend can be seen) or there are fewer than two.
pub fn trend_z(outcomes: &[bool]) -> f64 {
    let n = outcomes.len();
    if n < 2 {
        return 0.0;
    }
    let t_mean = (n - 1) as f64 / 2.0;
    let p = outcomes.iter().filter(|&&y| y).count() as f64 / n as f64;
    let spread: f64 = (0..n).map(|t| (t as f64 - t_mean).powi(2)).sum();
    let variance = p * (1.0 - p) * spread;
    if variance <= 0.0 {
        return 0.0;
    }
    let statistic: f64 = outcomes.iter().enumerate().filter(|(_, y)| **y).map(|(t, _)| t as f64 - t_mean).sum();
    statistic / variance.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_tails_match_hand_computed_values() {
        // P(X ≥ 8 | 10, ½) = (C(10,8) + C(10,9) + C(10,10)) / 2¹⁰ = (45 + 10 + 1) / 1024.
        assert!((binomial_upper_tail(8, 10, 0.5) - 56.0 / 1024.0).abs() < 1e-12);
        // All of 5 with p = 0.3: 0.3⁵.
        assert!((binomial_upper_tail(5, 5, 0.3) - 0.3f64.powi(5)).abs() < 1e-14);
        assert_eq!(binomial_upper_tail(0, 7, 0.2), 1.0);
        assert_eq!(binomial_upper_tail(8, 7, 0.2), 0.0);
        // P(X ≥ 1 | 3, 0.2) = 1 − 0.8³ = 0.488.
        assert!((binomial_upper_tail(1, 3, 0.2) - 0.488).abs() < 1e-12);
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        // Γ(n + 1) = n!: 10! = 3 628 800; Γ(½) = √π.
        assert!((ln_gamma(11.0) - 3_628_800f64.ln()).abs() < 1e-10);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-10);
    }

    #[test]
    fn normal_tail_matches_published_values() {
        // Φ(1.959964) = 0.975, Φ(3.090232) = 0.999 (standard tables).
        assert!((normal_upper_tail(1.959_964) - 0.025).abs() < 1e-6);
        assert!((normal_upper_tail(3.090_232) - 0.001).abs() < 1e-6);
        assert!((normal_upper_tail(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_upper_tail(-1.959_964) - 0.975).abs() < 1e-6);
    }

    #[test]
    fn trend_z_matches_hand_computation() {
        // Outcomes 0 0 1 1 at t = 0..3: t̄ = 1.5, p̄ = ½; Σ y(t − t̄) = 0.5 + 1.5 = 2;
        // Σ (t − t̄)² = 2.25 + 0.25 + 0.25 + 2.25 = 5; variance ¼·5; z = 2 / √1.25.
        assert!((trend_z(&[false, false, true, true]) - 2.0 / 1.25f64.sqrt()).abs() < 1e-12);
        assert!((trend_z(&[true, true, false, false]) + 2.0 / 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!(trend_z(&[true, true, true]), 0.0);
        assert_eq!(trend_z(&[true]), 0.0);
    }

    #[test]
    fn mean_sd_is_the_population_form() {
        // {0, 1}: mean ½, sd ½.
        assert_eq!(mean_sd([0.0, 1.0]), (0.5, 0.5, 2));
        assert_eq!(mean_sd(std::iter::empty()), (0.0, 0.0, 0));
    }
}
