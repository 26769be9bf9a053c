//! Choosing the next token from logits: repetition penalty, then greedy
//! (temperature 0) or temperature → top-k → softmax → top-p → a draw from a
//! seeded generator, so the same seed gives the same text. The penalty is
//! llama.cpp's and transformers': a repeated token's positive logit is
//! divided by it, a negative one multiplied.

use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no cut.
    pub top_k: usize,
    /// ≥ 1 (or 0) means no nucleus cut.
    pub top_p: f32,
    /// 1 (or 0) means no penalty.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

pub struct Sampler {
    config: SamplingConfig,
    state: u64,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let state = config.seed;
        Sampler { config, state }
    }

    /// SplitMix64: small, fast, and the same on every platform.
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token; `history` is what the penalty applies to (prompt and
    /// generated tokens). `logits` is modified.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let penalty = self.config.repetition_penalty;
        if penalty > 0.0 && penalty != 1.0 {
            let seen: HashSet<u32> = history.iter().copied().collect();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
                }
            }
        }
        if self.config.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, l / self.config.temperature)).collect();
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.config.top_k > 0 {
            candidates.truncate(self.config.top_k);
        }
        let max = candidates[0].1;
        let mut total = 0f64;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|&(_, l)| {
                let p = ((l - max) as f64).exp();
                total += p;
                p
            })
            .collect();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.config.top_p > 0.0 && self.config.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= self.config.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let kept: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= kept);
        }
        let mut draw = self.uniform();
        for (i, p) in probs.iter().enumerate() {
            if draw < *p {
                return candidates[i].0;
            }
            draw -= p;
        }
        candidates[probs.len() - 1].0
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &l)| if l > best.1 { (i, l) } else { best }).0
        as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, -1.0, 2.9, 0.5]
    }

    #[test]
    fn greedy_takes_the_largest_after_the_penalty() {
        let mut greedy = Sampler::new(SamplingConfig::default());
        assert_eq!(greedy.sample(&mut logits(), &[]), 1);
        let mut penalised = Sampler::new(SamplingConfig { repetition_penalty: 1.1, ..Default::default() });
        // 3.0 / 1.1 = 2.73 falls below 2.9.
        assert_eq!(penalised.sample(&mut logits(), &[1, 1]), 4);
        let mut l = logits();
        penalised.sample(&mut l, &[3]);
        assert!((l[3] - -1.1).abs() < 1e-6, "negative logits are multiplied");
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_cuts_hold() {
        let config = SamplingConfig { temperature: 1.0, seed: 42, ..Default::default() };
        let draws = |config: &SamplingConfig| {
            let mut s = Sampler::new(config.clone());
            (0..200).map(|_| s.sample(&mut logits(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draws(&config), draws(&config));
        assert_ne!(draws(&config), draws(&SamplingConfig { seed: 43, ..config.clone() }));
        let all = draws(&config);
        assert!(all.contains(&0) && all.contains(&2), "temperature 1 reaches beyond the top two");

        let top2 = draws(&SamplingConfig { top_k: 2, ..config.clone() });
        assert!(top2.iter().all(|t| [1, 4].contains(t)) && top2.contains(&1) && top2.contains(&4));
        // p(1) ≈ 0.37, p(4) ≈ 0.34 of the full softmax: top_p 0.5 keeps exactly those two.
        let nucleus = draws(&SamplingConfig { top_p: 0.5, ..config.clone() });
        assert!(nucleus.iter().all(|t| [1, 4].contains(t)));
        let cold = draws(&SamplingConfig { temperature: 0.01, ..config });
        assert!(cold.iter().filter(|&&t| t == 1).count() > 190, "low temperature is nearly greedy");
    }
}
