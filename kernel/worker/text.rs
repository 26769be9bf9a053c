//! Word-level text similarity: which of two candidate replies a sent text
//! (or a reference reply) is closer to. Cosine of lowercase word counts:
//! cheap, order-free, and enough to tell an edited candidate from the other.

use std::collections::HashMap;

pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase)
}

fn counts(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for w in words(text) {
        *out.entry(w).or_insert(0.0) += 1.0;
    }
    out
}

/// Cosine similarity of word counts, in [0, 1]; 0 when either text has no words.
pub fn similarity(a: &str, b: &str) -> f64 {
    let (a, b) = (counts(a), counts(b));
    let dot: f64 = a.iter().filter_map(|(w, x)| b.get(w).map(|y| x * y)).sum();
    let norm = |m: &HashMap<String, f64>| m.values().map(|v| v * v).sum::<f64>().sqrt();
    let denominator = norm(&a) * norm(&b);
    if denominator == 0.0 { 0.0 } else { dot / denominator }
}

#[cfg(test)]
mod tests {
    use super::similarity;

    #[test]
    fn similarity_is_cosine_of_word_counts() {
        assert!((similarity("Refunds take 14 days", "refunds TAKE 14 days!") - 1.0).abs() < 1e-12);
        assert_eq!(similarity("a b", "c d"), 0.0);
        assert_eq!(similarity("", "anything"), 0.0);
        // {a:2, b:1} · {a:1} = 2; norms √5 and 1.
        assert!((similarity("a a b", "a") - 2.0 / 5f64.sqrt()).abs() < 1e-12);
    }
}
