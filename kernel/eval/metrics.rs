//! Ranking metrics with binary relevance, macro-averaged over queries
//! (definitions in ../shared/data/README.md): Recall@k = |rel ∩ top-k| /
//! |rel|, Precision@k = |rel ∩ top-k| / k, nDCG@10 with binary gains, MRR.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// Cut-offs reported for recall and precision.
pub const RECALL_AT: [usize; 4] = [5, 10, 20, 75];
pub const PRECISION_AT: [usize; 3] = [1, 5, 8];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RankingMetrics {
    pub queries: usize,
    /// (k, mean Recall@k)
    pub recall: Vec<(usize, f64)>,
    /// (k, mean Precision@k)
    pub precision: Vec<(usize, f64)>,
    pub ndcg_at_10: f64,
    pub mrr: f64,
}

impl RankingMetrics {
    /// Mean Recall@k, when k is one of RECALL_AT.
    pub fn recall_at(&self, k: usize) -> Option<f64> {
        self.recall.iter().find(|(at, _)| *at == k).map(|(_, v)| *v)
    }

    /// Mean Precision@k, when k is one of PRECISION_AT.
    pub fn precision_at(&self, k: usize) -> Option<f64> {
        self.precision.iter().find(|(at, _)| *at == k).map(|(_, v)| *v)
    }
}

/// Per-query scores, before averaging.
#[derive(Debug, Clone)]
pub struct QueryScores {
    recall: Vec<f64>,
    precision: Vec<f64>,
    ndcg_at_10: f64,
    reciprocal_rank: f64,
}

/// Scores one ranked list against its relevant set.
pub fn score_query(ranked: &[&str], relevant: &HashSet<&str>) -> QueryScores {
    let hits_within = |k: usize| ranked.iter().take(k).filter(|id| relevant.contains(**id)).count() as f64;
    let total = relevant.len().max(1) as f64;
    let dcg: f64 = ranked
        .iter()
        .take(10)
        .enumerate()
        .filter(|(_, id)| relevant.contains(**id))
        .map(|(i, _)| 1.0 / (i as f64 + 2.0).log2())
        .sum();
    let ideal: f64 = (0..relevant.len().min(10)).map(|i| 1.0 / (i as f64 + 2.0).log2()).sum();
    QueryScores {
        recall: RECALL_AT.iter().map(|&k| hits_within(k) / total).collect(),
        precision: PRECISION_AT.iter().map(|&k| hits_within(k) / k as f64).collect(),
        ndcg_at_10: if ideal > 0.0 { dcg / ideal } else { 0.0 },
        reciprocal_rank: ranked.iter().position(|id| relevant.contains(*id)).map_or(0.0, |p| 1.0 / (p as f64 + 1.0)),
    }
}

pub fn average(scores: &[QueryScores]) -> RankingMetrics {
    let n = scores.len().max(1) as f64;
    let mean = |f: &dyn Fn(&QueryScores) -> f64| scores.iter().map(f).sum::<f64>() / n;
    RankingMetrics {
        queries: scores.len(),
        recall: RECALL_AT.iter().enumerate().map(|(i, &k)| (k, mean(&|s| s.recall[i]))).collect(),
        precision: PRECISION_AT.iter().enumerate().map(|(i, &k)| (k, mean(&|s| s.precision[i]))).collect(),
        ndcg_at_10: mean(&|s| s.ndcg_at_10),
        mrr: mean(&|s| s.reciprocal_rank),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_follow_their_definitions() {
        let relevant: HashSet<&str> = ["a", "c"].into();
        let s = score_query(&["x", "a", "y", "z", "c", "q"], &relevant);
        assert_eq!(s.recall[0], 1.0, "both within 5");
        assert_eq!(s.precision, vec![0.0, 2.0 / 5.0, 2.0 / 8.0]);
        assert_eq!(s.reciprocal_rank, 0.5);
        let dcg = 1.0 / 3f64.log2() + 1.0 / 6f64.log2();
        let ideal = 1.0 + 1.0 / 3f64.log2();
        assert!((s.ndcg_at_10 - dcg / ideal).abs() < 1e-12);
        let none = score_query(&["x"], &relevant);
        let avg = average(&[s, none]);
        assert_eq!(avg.queries, 2);
        assert_eq!(avg.mrr, 0.25);
        assert_eq!(avg.recall[0], (5, 0.5));
    }
}
