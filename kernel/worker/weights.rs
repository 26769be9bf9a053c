//! The judge's weight mode (`[judge] mode = "weight"`): instead of dropping
//! an annotation some check failed, every annotation trains with a weight
//! in [0, 1], the product of
//! - its verdicts: 1 when every check passed, `failed_weight` when one
//!   failed (the agent-level checks are statistical statements about the
//!   agent, not certainties about the label);
//! - its agent's reliability: the agent's Laplace-smoothed share of
//!   accepted annotations, (accepted + 1) / (annotations + 2), over the most
//!   reliable agent's, so the best agent's labels weigh 1;
//! - its delay: `late_weight` for an annotation made more than
//!   `late_report_seconds` after the output was shown, the paper's
//!   agreement of delayed over immediate feedback (63.9% / 76.5%).
//!
//! `datasets.rs` writes the weights into the rows; the retriever and ranker
//! trainers take weighted means of their losses.

use std::collections::HashMap;

use super::{datasets::rejections, journal::Journal, judge::JudgeOptions};

/// Annotation id → weight in [0, 1], for every journaled annotation.
pub fn annotation_weights(journal: &Journal, options: &JudgeOptions) -> HashMap<String, f32> {
    let rejected = rejections(journal);
    let mut by_agent: HashMap<&str, (usize, usize)> = HashMap::new();
    for a in &journal.annotations {
        let (accepted, all) = by_agent.entry(a.agent_id.as_str()).or_default();
        *all += 1;
        *accepted += usize::from(!rejected.contains_key(&a.annotation_id));
    }
    let reliability: HashMap<&str, f64> = by_agent
        .iter()
        .map(|(agent, (accepted, all))| (*agent, (*accepted as f64 + 1.0) / (*all as f64 + 2.0)))
        .collect();
    let best = reliability.values().copied().fold(0.0, f64::max);
    journal
        .annotations
        .iter()
        .map(|a| {
            let verdicts = if rejected.contains_key(&a.annotation_id) { options.failed_weight } else { 1.0 };
            let agent = reliability.get(a.agent_id.as_str()).copied().unwrap_or(1.0) / best.max(f64::MIN_POSITIVE);
            let delay = if a.delay_seconds() > options.late_report_seconds { options.late_weight } else { 1.0 };
            (a.annotation_id.clone(), (verdicts * agent * delay).clamp(0.0, 1.0) as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::rows::{AnnotationRow, Feedback, Row, Verdict};

    fn annotation(id: &str, agent: &str, delay_s: f64) -> Row {
        Row::Annotation(AnnotationRow {
            tenant: crate::tenancy::DEFAULT_TENANT.into(),
            sequence: 0,
            annotation_id: id.into(),
            interaction_id: "i".into(),
            agent_id: agent.into(),
            case_id: String::new(),
            shown_ms: 0,
            annotated_ms: (delay_s * 1000.0) as i64,
            feedback: Feedback::Relevance { judgements: Vec::new() },
        })
    }

    #[test]
    fn weights_multiply_verdicts_reliability_and_delay() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        // Agent a: 2 annotations, none rejected → (2+1)/(2+2) = 0.75, the best.
        // Agent b: 2 annotations, one rejected → (1+1)/(2+2) = 0.5, relative 0.5/0.75 = 2/3.
        for row in [
            annotation("a1", "a", 10.0),
            annotation("a2", "a", 7_200.0),
            annotation("b1", "b", 10.0),
            annotation("b2", "b", 10.0),
            Row::Verdict(Verdict {
                annotation_id: "b2".into(),
                check: "too_fast".into(),
                pass: false,
                score: 0.0,
                reason: String::new(),
            }),
        ] {
            journal.stage(row).unwrap();
        }
        let options = JudgeOptions::default();
        let w = annotation_weights(&journal, &options);
        assert!((w["a1"] - 1.0).abs() < 1e-6);
        // Two hours late: 63.9 / 76.5.
        assert!((f64::from(w["a2"]) - 63.9 / 76.5).abs() < 1e-6, "{}", w["a2"]);
        assert!((f64::from(w["b1"]) - 2.0 / 3.0).abs() < 1e-6, "{}", w["b1"]);
        // Rejected: failed_weight 0.1 × 2/3.
        assert!((f64::from(w["b2"]) - 0.1 * 2.0 / 3.0).abs() < 1e-6, "{}", w["b2"]);
    }
}
